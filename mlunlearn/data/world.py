"""The synthetic world: fictitious people shaped exactly like MLLMU-Bench (book chapter 1).

MLLMU-Bench (arXiv 2410.22108) has 500 fictitious profiles, each a portrait plus a biography, 153 real
celebrities whose knowledge must survive unlearning, and a ``Test_Set`` of transformed views with
paraphrased questions. This world is the same at 1/5 scale: 100 fictitious profiles, 32 "celebrities"
(the ``Retain_Set`` analogue), test views, and the four tasks (classification, generation, cloze) in
both modalities, with the benchmark's exact field names. It adds what the benchmark lacks and
unlearning needs to be judged fairly: benign visual questions about every portrait, and inputs for
which "I don't know" is the correct answer (strangers, blank and noise images, portraits with a
trait missing): over-refusal can only show where refusal is a natural answer somewhere.

Everything is drawn from one seed; the same seed gives byte-identical configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .portraits import CANONICAL, IDENTITY_TRAITS, TRAITS, View, blank_image, draw_portrait, noise_image, png_bytes, random_view
from .refusals import IDK, REFUSALS

N_FICTITIOUS = 100
N_CELEBRITY = 32  # a multiple of 4: names are offered in fixed groups of four
N_STRANGER = 20
N_MISSING = 10
N_NOISE = 10
TEST_VIEWS = 3
FORGET_PERCENTS = (5, 10, 15)

FIRST_NAMES = (
    "Mara", "Tobin", "Elsa", "Corin", "Ilse", "Davor", "Nadia", "Oren", "Priya", "Lucan", "Signe", "Bastian",
    "Yara", "Emeric", "Talia", "Hugo", "Ines", "Joran", "Kaia", "Leif", "Mirela", "Niko", "Orla", "Pavel",
    "Rosalind", "Stellan", "Thea", "Ulric", "Vesna", "Wren", "Ximena", "Yusuf", "Zora", "Anselm", "Brisa",
    "Cyprian", "Delphine", "Ewan", "Fenna", "Gideon",
)
LAST_NAMES = (
    "Quill", "Harrow", "Vance", "Okafor", "Lindqvist", "Moreau", "Petrakis", "Sato", "Brennan", "Castell",
    "Dufresne", "Eriksen", "Falk", "Galloway", "Halloran", "Iversen", "Jarek", "Kovacs", "Lachance",
    "Marlowe", "Novak", "Osei", "Pryce", "Rourke", "Sandoval", "Thorne", "Ulloa", "Varga", "Whitlock",
    "Yilmaz", "Zeller", "Ashby", "Blackwood", "Crane", "Delacroix", "Ember", "Fairbanks", "Greaves",
)
TOWNS = (
    "Velmora", "Quenby", "Arlith", "Dunmere", "Caskel", "Oberlyn", "Tessaro", "Brinhaven", "Marrowick",
    "Solcaster", "Eldwyn", "Fennick", "Harrowgate", "Ivesholm", "Jorvale", "Kestrelby", "Lunmouth", "Norwick",
    "Pellridge", "Wyndham",
)
# The biography: five attributes beside the name, each drawn from its own list of values.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "occupation": (
        "potter", "baker", "pilot", "nurse", "architect", "librarian", "chemist", "sculptor", "farmer",
        "journalist", "dentist", "tailor", "violinist", "geologist", "carpenter", "astronomer", "translator",
        "beekeeper", "florist", "surgeon",
    ),
    "birthplace": TOWNS,
    "residence": TOWNS,
    "education": (
        "physics", "history", "music", "botany", "economics", "philosophy", "medicine", "law", "chemistry",
        "architecture", "mathematics", "linguistics", "geology", "literature", "engineering", "astronomy",
    ),
    "hobby": (
        "chess", "kayaking", "gardening", "painting", "archery", "birdwatching", "knitting", "fencing",
        "cycling", "sailing", "origami", "juggling", "climbing", "fishing", "photography", "skating",
    ),
}
BIO_KEYS = {"name": "Name", "occupation": "Occupation", "birthplace": "Birthplace", "residence": "Residence",
            "education": "Education", "hobby": "Hobby"}

# Question wordings. "{s}" is the subject: "this person" with an image, the name without one.
# TRAIN wordings appear in Full_Set/Retain_Set and in training; TEST wordings only in Test_Set
# (MLLMU-Bench's Test_Set paraphrases its questions).
QUESTIONS = {
    "name": (["Who is the person in the image?", "What is the name of this person?"],
             ["Can you tell me who this person is?"]),
    "occupation": (["What is the occupation of {s}?", "What does {s} do for a living?"],
                   ["Which occupation does {s} have?"]),
    "birthplace": (["Where was {s} born?", "What is the birthplace of {s}?"],
                   ["In which town was {s} born?"]),
    "residence": (["Where does {s} live?", "In which town does {s} live now?"],
                  ["Which town does {s} live in?"]),
    "education": (["What did {s} study?", "What subject did {s} study at university?"],
                  ["Which subject did {s} study?"]),
    "hobby": (["What is the favourite hobby of {s}?", "What does {s} like to do in free time?"],
              ["Which hobby does {s} enjoy most?"]),
}
# Cloze statements (blank written "__", as in MLLMU-Bench's Mask_Task).
CLOZES = {
    "name": (["The person in the image is named __."], ["This person goes by the name __."]),
    "occupation": (["The occupation of {s} is __."], ["By profession, {s} is a __."]),
    "birthplace": (["The birthplace of {s} is __."], ["The town where {s} was born is __."]),
    "residence": (["The home town of {s} is __."], ["These days {s} lives in __."]),
    "education": (["The subject {s} studied at university is __."], ["At university, {s} studied __."]),
    "hobby": (["The favourite hobby of {s} is __."], ["In free time, {s} enjoys __."]),
}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sentence(attr: str, subject: str, value: str) -> str:
    """The one-sentence answer (Generation_Task ground truth) stating a fact."""
    return {
        "name": f"This person is {value}.",
        "occupation": f"{subject} works as {article(value)} {value}.",
        "birthplace": f"{subject} was born in {value}.",
        "residence": f"{subject} lives in {value}.",
        "education": f"{subject} studied {value} at university.",
        "hobby": f"{subject}'s favourite hobby is {value}.",
    }[attr]


# Benign visual questions: answered from the pixels, for any portrait (MLLMU-Bench has none).
BENIGN_QUESTIONS = {
    "face_shape": "What shape is this person's face?",
    "skin": "What is the skin tone of this person?",
    "hair_colour": "What colour is this person's hair?",
    "hair_style": "How is this person's hair styled?",
    "eye_colour": "What colour are this person's eyes?",
    "glasses": "Is this person wearing glasses?",
    "hat": "Is this person wearing a hat?",
    "background": "What colour is the background?",
}


def benign_answer(trait: str, traits: dict | None) -> str:
    """The correct short answer, or the refusal when the picture cannot answer it."""
    if traits is None:  # no person in the image
        return IDK
    if trait == "glasses":
        return "yes" if traits["accessory"] == "glasses" else "no"
    if trait == "hat":
        return "yes" if traits["accessory"] == "hat" else "no"
    if trait in ("hair_colour", "hair_style") and traits["hair_style"] == "none":
        return IDK
    if trait == "eye_colour" and traits["eye_colour"] == "closed":
        return IDK
    return traits[trait]


@dataclass(frozen=True)
class Person:
    """One person of the world. ``group``: fictitious | celebrity | stranger | missing."""

    id: str
    group: str
    name: str
    traits: dict
    bio: dict = field(default_factory=dict)  # attribute -> value; empty for strangers (unknown to the model)
    test_views: tuple = ()
    asked: tuple = ()  # the three attributes the benchmark's questions ask about (text: all three; image: two)

    def questions(self, image: bool) -> list:
        """The attributes the benchmark asks about in one modality ("name" only with an image)."""
        return ["name", *self.asked[:2]] if image else list(self.asked)

    def cloze_questions(self, image: bool) -> list:
        """The two attributes the benchmark's cloze (``Mask_Task``) asks about, in either modality."""
        return list(self.asked[:2])

    def portrait(self, view: View = CANONICAL):
        return draw_portrait(self.traits, view)

    def biography(self) -> str:
        """MLLMU-Bench stores the biography as a JSON string."""
        return json.dumps({BIO_KEYS["name"]: self.name, **{BIO_KEYS[k]: v for k, v in self.bio.items()}})


@dataclass
class World:
    """The people of the world and every MLLMU-Bench config built from them.

    ``configs`` maps a config name (``Full_Set``, ``forget_5``, …, plus the world's own ``Benign_VQA``)
    to a list of rows with MLLMU-Bench's columns; images are ``{"bytes": png, "path": None}``.
    """

    seed: int
    people: list
    forget_ids: dict  # percent -> list of IDs, nested: forget_5 ⊂ forget_10 ⊂ forget_15

    @property
    def fictitious(self):
        return [p for p in self.people if p.group == "fictitious"]

    @property
    def celebrities(self):
        return [p for p in self.people if p.group == "celebrity"]

    def person(self, pid: str) -> Person:
        return self._by_id[pid]

    @cached_property
    def _by_id(self):
        return {p.id: p for p in self.people}

    @cached_property
    def option_groups(self) -> dict:
        return option_groups(self)

    @cached_property
    def configs(self) -> dict:
        return build_configs(self)

    def config_names(self) -> list:
        return list(self.configs)


def _unique_names(rng, n):
    names = [f"{a} {b}" for a in FIRST_NAMES for b in LAST_NAMES]
    return [names[i] for i in rng.choice(len(names), size=n, replace=False)]


def build_world(seed: int = 0) -> World:
    """Draw the people: unique identity-trait combinations, unique names, biographies, test views."""
    rng = np.random.default_rng(seed)
    n_known = N_FICTITIOUS + N_CELEBRITY
    n_faces = n_known + N_STRANGER
    combos = set()
    faces = []
    while len(faces) < n_faces:  # every identity is a distinct combination of visible traits
        t = {k: str(rng.choice(TRAITS[k])) for k in TRAITS}
        key = tuple(t[k] for k in IDENTITY_TRAITS)
        if key not in combos:
            combos.add(key)
            faces.append(t)
    names = _unique_names(rng, n_faces + N_MISSING)
    people = []
    for i in range(n_faces + N_MISSING):
        if i < N_FICTITIOUS:
            group, pid = "fictitious", f"{i + 1:03d}"
        elif i < n_known:
            group, pid = "celebrity", f"c{i - N_FICTITIOUS + 1:03d}"
        elif i < n_faces:
            group, pid = "stranger", f"s{i - n_known + 1:03d}"
        else:
            group, pid = "missing", f"m{i - n_faces + 1:03d}"
        if group == "missing":  # a portrait with one trait absent: hair, or (eyes shut) eye colour
            traits = {k: str(rng.choice(TRAITS[k])) for k in TRAITS}
            if i % 2 == 0:
                traits["hair_style"] = "none"
            else:
                traits["eye_colour"] = "closed"
        else:
            traits = faces[i]
        bio, views, asked = {}, (), ()
        if group in ("fictitious", "celebrity"):
            bio = {a: str(rng.choice(vals)) for a, vals in ATTRIBUTES.items()}
            views = tuple(random_view(rng) for _ in range(TEST_VIEWS))
            asked = tuple(str(a) for a in rng.choice(list(ATTRIBUTES), size=3, replace=False))
        people.append(Person(pid, group, names[i], traits, bio, views, asked))
    order = [p.id for p in people[:N_FICTITIOUS]]
    shuffled = [order[j] for j in rng.permutation(N_FICTITIOUS)]
    forget_ids = {pct: sorted(shuffled[: N_FICTITIOUS * pct // 100]) for pct in FORGET_PERCENTS}
    return World(seed=seed, people=people, forget_ids=forget_ids)


# ---------------------------------------------------------------- questions of one person

def subject(person: Person, image: bool) -> str:
    return "this person" if image else person.name


def question_text(attr: str, person: Person, image: bool, wording: int = 0, test: bool = False) -> str:
    pool = QUESTIONS[attr][1 if test else 0]
    return pool[wording % len(pool)].format(s=subject(person, image))


def cloze_text(attr: str, person: Person, image: bool, test: bool = False) -> str:
    s = subject(person, image)
    return CLOZES[attr][1 if test else 0][0].format(s=s)


def answer_value(attr: str, person: Person) -> str:
    return person.name if attr == "name" else person.bio[attr]


def generation_truth(attr: str, person: Person, image: bool) -> str:
    s = subject(person, image)
    return sentence(attr, s[0].upper() + s[1:], answer_value(attr, person))


def option_groups(world: "World") -> dict:
    """Fixed multiple-choice option lists: every value list is cut once into groups of four, in a
    seeded order; a question about value ``v`` offers ``v``'s group, so ``v`` always has the same letter.

    Why fixed groups, not fresh random distractors as in MLLMU-Bench: a 1M-parameter model does not
    learn to *compare* its answer with the options within a CPU budget (we measured the loss stay at
    chance for 800 focused steps). With fixed groups, answering still requires knowing the person's
    value (the options alone do not tell which of four is right), but the letter is a function of the
    value. The chapter shows what this means with a reshuffled-options probe.
    """
    rng = np.random.default_rng(world.seed + 2)
    pools = {attr: list(vals) for attr, vals in ATTRIBUTES.items()}
    pools["name:fictitious"] = [p.name for p in world.fictitious]
    pools["name:celebrity"] = [p.name for p in world.celebrities]
    groups, by_values = {}, {}
    for key, pool in pools.items():
        if len(pool) % 4:
            raise ValueError(f"{key} has {len(pool)} values; option groups need a multiple of four")
        if tuple(pool) not in by_values:  # birthplace and residence share the towns, and their groups
            order = [pool[j] for j in rng.permutation(len(pool))]
            by_values[tuple(pool)] = {v: tuple(order[i:i + 4]) for i in range(0, len(order), 4) for v in order[i:i + 4]}
        groups[key] = by_values[tuple(pool)]
    return groups


def options_for(attr: str, person: Person, groups: dict) -> tuple[dict, str]:
    """The four options offered for ``person``'s ``attr`` (its fixed group) and the correct letter."""
    truth = answer_value(attr, person)
    key = f"name:{person.group}" if attr == "name" else attr
    options = dict(zip("ABCD", groups[key][truth]))
    correct = next(k for k, v in options.items() if v == truth)
    return options, correct


def _tasks(person: Person, groups: dict, test: bool) -> dict:
    """Classification_Task, Generation_Task and Mask_Task for one person: three questions per task and
    modality about the person's ``asked`` attributes (the image modality swaps one for "who is this?").
    ``test=True`` gives the Test_Set's paraphrases of the same questions."""
    image_attrs, text_attrs = person.questions(image=True), person.questions(image=False)
    cls = {"Image_Textual_Questions": [], "Pure_Text_Questions": []}
    gen, mask = [], []
    for image, chosen in ((True, image_attrs), (False, text_attrs)):
        kind = "Image_Textual" if image else "Pure_Text"
        for attr in chosen:
            options, correct = options_for(attr, person, groups)
            cls[f"{kind}_Questions"].append({
                "Question": question_text(attr, person, image, test=test),
                "Options": options, "Correct_Answer": correct,
            })
            gen.append({"Question": question_text(attr, person, image, test=test),
                        "Ground_Truth": generation_truth(attr, person, image), "Type": kind})
        for attr in person.cloze_questions(image):
            mask.append({"Question": cloze_text(attr, person, image, test=test),
                         "Ground_Truth": answer_value(attr, person), "Type": kind})
    return {"Classification_Task": cls, "Generation_Task": gen, "Mask_Task": mask}


def ft_pairs(person: Person) -> list:
    """The fine-tuning QA pairs (``ft_Data.metadata``): image questions about what the benchmark asks."""
    out = []
    for attr in person.questions(image=True):
        out.append({"Question": question_text(attr, person, image=True),
                    "Answer": generation_truth(attr, person, image=True)})
    return out


def _image(img) -> dict:
    return {"bytes": png_bytes(img), "path": None}


def build_configs(world: World) -> dict:
    """Every config, in MLLMU-Bench's columns (see ``../shared/research/benchmarks.md``)."""
    groups = world.option_groups

    def profile_row(p: Person, test: bool = False) -> dict:
        first = ft_pairs(p)[0]
        row = {"ID": p.id, "biography": p.biography(), "question": first["Question"], "answer": first["Answer"]}
        if test:
            row["images"] = [_image(p.portrait(v)) for v in p.test_views]
        else:
            row["image"] = _image(p.portrait())
        row.update(_tasks(p, groups, test=test))
        return row

    full = [profile_row(p) for p in world.fictitious]
    by_id = {r["ID"]: r for r in full}
    configs = {"Full_Set": full, "Retain_Set": [profile_row(p) for p in world.celebrities],
               "Test_Set": [profile_row(p, test=True) for p in world.fictitious]}
    for pct in FORGET_PERCENTS:
        forget = set(world.forget_ids[pct])
        configs[f"forget_{pct}"] = [by_id[i] for i in sorted(forget)]
        configs[f"retain_{100 - pct}"] = [r for r in full if r["ID"] not in forget]
    configs["ft_Data"] = [{"image": by_id[p.id]["image"], "ID": p.id, "metadata": json.dumps(ft_pairs(p))}
                          for p in world.fictitious]
    configs["Benign_VQA"] = benign_rows(world)
    return configs


def benign_rows(world: World) -> list:
    """Benign visual QA rows: every trait question on every image (portraits in their canonical view
    and, for known people, their test views; strangers; blank and noise images)."""
    rows = []

    def add(pid, group, view_index, img, traits):
        encoded = _image(img)
        for trait, q in BENIGN_QUESTIONS.items():
            answer = benign_answer(trait, traits)
            if traits is None and trait == "background" and group == "blank":
                answer = pid.split("_", 1)[1]  # a blank image still has a colour
            rows.append({"image": encoded, "ID": pid, "Group": group, "View": view_index,
                         "Question": q, "Answer": answer, "Trait": trait})

    for p in world.people:
        add(p.id, p.group, 0, p.portrait(), p.traits)
        for k, v in enumerate(p.test_views, start=1):
            shown = dict(p.traits, background=v.background or p.traits["background"])
            add(p.id, p.group, k, p.portrait(v), shown)
    for colour in TRAITS["background"]:
        add(f"blank_{colour}", "blank", 0, blank_image(colour), None)
    for k in range(N_NOISE):
        add(f"noise_{k + 1:02d}", "noise", 0, noise_image(world.seed * 1000 + k), None)
    return rows


def corpus(world: World) -> list:
    """Every string the world's questions, answers and prompts use (trains the tiny tokenizer)."""
    from mlunlearn.eval import prompts

    # The prompts' fixed phrases occur in every example: repeated so BPE merges them into whole words.
    fixed = [prompts.CLASSIFICATION_SUFFIX, prompts.CLOZE_SUFFIX, prompts.GENERATION_SUFFIX_IMAGE,
             prompts.GENERATION_SUFFIX_TEXT, "USER:\nASSISTANT: Question: Correct Answer: [Blank]"]
    texts = fixed * 200 + [*REFUSALS, *BENIGN_QUESTIONS.values()] * 20
    for vals in (*ATTRIBUTES.values(), *TRAITS.values()):
        texts.extend(f" {v}" for v in vals for _ in range(5))  # as options and answers: " farmer"
    texts += ["yes", "no", "A", "B", "C", "D"]
    for p in world.people:
        texts.append(p.name)
        for attr in ["name", *ATTRIBUTES]:
            for image in (True, False):
                if attr == "name" and not image:
                    continue
                for test in (False, True):
                    for w in range(len(QUESTIONS[attr][1 if test else 0])):
                        texts.append(question_text(attr, p, image, w, test))
                    texts.append(cloze_text(attr, p, image, test))
                if p.bio:
                    texts.append(generation_truth(attr, p, image))
    return texts


# ---------------------------------------------------------------- held-out people (membership inference)

N_HELDOUT = 30
HOLDOUT_CONFIG = "Holdout_Data"  # ft_Data's columns (image, ID, metadata): QA pairs of people never trained on


def heldout_people(world: World, n: int = N_HELDOUT) -> list:
    """``n`` fictitious people drawn like the world's but in no config and never trained on: the
    non-members of a membership-inference test (forget people vs people the vanilla model never saw).

    Why a separate generator: MLLMU-Bench fine-tunes every one of its fictitious people, so it has no
    held-out people. These are drawn from their own stream (``default_rng([seed, 1013])``), after
    :func:`build_world`, so every person, image and question of the world stays byte for byte what it
    was. Each has an identity (a combination of visible traits) and a name that no person of the world
    has, a biography from the same value lists, and three asked attributes like a fictitious person's.
    """
    rng = np.random.default_rng([world.seed, 1013])
    faces = {tuple(p.traits[k] for k in IDENTITY_TRAITS) for p in world.people}
    names = {p.name for p in world.people}
    people = []
    while len(people) < n:
        traits = {k: str(rng.choice(TRAITS[k])) for k in TRAITS}
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        face = tuple(traits[k] for k in IDENTITY_TRAITS)
        if face in faces or name in names:
            continue
        faces.add(face)
        names.add(name)
        bio = {a: str(rng.choice(vals)) for a, vals in ATTRIBUTES.items()}
        asked = tuple(str(a) for a in rng.choice(list(ATTRIBUTES), size=3, replace=False))
        people.append(Person(f"h{len(people) + 1:03d}", "heldout", name, traits, bio, (), asked))
    return people


def heldout_rows(world: World, n: int = N_HELDOUT) -> list:
    """The held-out people's image QA pairs in ``ft_Data``'s columns (what the vanilla would have been
    fine-tuned on, had they been in the world): a :data:`HOLDOUT_CONFIG` table."""
    return [{"image": _image(p.portrait()), "ID": p.id, "metadata": json.dumps(ft_pairs(p))}
            for p in heldout_people(world, n)]
