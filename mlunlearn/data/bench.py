"""Read and write benchmarks in MLLMU-Bench's exact Hugging Face layout.

One loader serves the synthetic world and the real benchmark (book chapter 1):

- ``"toyworld"``: the synthetic world, built in memory from seed 0 (``"toyworld:7"`` for seed 7);
- ``"mllmu-bench"``: the hub dataset ``MLLMMU/MLLMU-Bench`` (downloads the config's parquet files);
- ``"mllmu-bench:<folder>"`` or a plain folder: a local copy in the hub layout,
  ``{folder}/{config}/train-0000X-of-0000N.parquet``.

Rows come back as plain dicts with the benchmark's columns; images stay as ``{"bytes": png, "path": ...}``
(decode them with :func:`decode_image`).
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

HUB_ID = "MLLMMU/MLLMU-Bench"
# Columns stored as JSON strings by some exports; parsed back to Python structures on load, and the
# JSON kind each must hold (Classification_Task: {"Image_Textual_Questions": [...], ...}).
_NESTED = {"Classification_Task": dict, "Generation_Task": list, "Mask_Task": list}
# ft_Data's question-answer pairs: a JSON string in the hub's files, kept as one (parsed by the unlearning
# data), but checked on load so that a bad cell is named here rather than failing mid-run.
_JSON_CHECKED = {"metadata": list}
_KIND_NAMES = {dict: "a JSON object", list: "a JSON list"}


class BenchmarkError(ValueError):
    """A benchmark that cannot be read as asked; the message names the problem and the fix."""


def decode_image(obj) -> Image.Image:
    """An RGB PIL image from a Hugging Face image cell (``{"bytes": ...}``), raw bytes, or a PIL image."""
    if isinstance(obj, Image.Image):
        return obj.convert("RGB")
    data = obj.get("bytes") if isinstance(obj, dict) else obj
    if not data:
        raise BenchmarkError("image cell has no bytes; re-export the benchmark with images embedded as PNG bytes")
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise BenchmarkError(f"unreadable image ({exc.__class__.__name__}); check the parquet file's image bytes") from None


def require_columns(rows: list, columns, config: str) -> None:
    """Raise a one-line error when ``rows`` lack any of ``columns``."""
    if not rows:
        raise BenchmarkError(f"config '{config}' is empty; choose a config with rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise BenchmarkError(f"config '{config}' has no column {', '.join(map(repr, missing))}; "
                             f"it has {sorted(rows[0])} — is this MLLMU-Bench's layout?")


def parse_json_cell(text: str, config: str, column: str, row_id=None, kind: type | None = None):
    """Parse one JSON-string cell; a cell that does not parse (or is not of ``kind``, list or dict) is a
    one-line :class:`BenchmarkError` naming the config, the column and the row's ID."""
    where = f"config '{config}', column '{column}', row ID {row_id if row_id is not None else '?'}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{where}: the JSON string does not parse ({exc.msg}, character {exc.pos} of "
                             f"{len(text)}; truncated?); fix: re-export that cell as valid JSON") from None
    if kind is not None and value is not None and not isinstance(value, kind):
        raise BenchmarkError(f"{where}: the JSON holds {type(value).__name__} {str(value)[:30]!r}, not "
                             f"{_KIND_NAMES.get(kind, kind.__name__)}; fix: re-export that cell in "
                             "MLLMU-Bench's layout")
    return value


class Benchmark:
    """A benchmark's configs, loaded on demand and cached. ``name`` is what the user passed."""

    def __init__(self, name: str, folder: Path | None = None, configs: dict | None = None, hub_id: str | None = None):
        self.name, self.folder, self._configs, self.hub_id = name, folder, configs, hub_id
        self._cache: dict = {}

    def available(self) -> list:
        if self._configs is not None:
            return list(self._configs)
        if self.folder is not None:
            return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
        return []  # the hub: not listed without a network call

    def has(self, config: str) -> bool:
        if self.hub_id is not None:
            return config != "Benign_VQA"  # the real benchmark has no benign visual questions
        return config in self.available()

    def load(self, config: str) -> list:
        """The rows of one config, as dicts in the benchmark's columns."""
        if config not in self._cache:
            self._cache[config] = self._read(config)
        return self._cache[config]

    def _read(self, config: str) -> list:
        if self._configs is not None:
            if config not in self._configs:
                raise BenchmarkError(f"config '{config}' not in {self.name}; available: {', '.join(self.available())}")
            return self._configs[config]
        folder = self.folder / config if self.folder is not None else _hub_folder(self.hub_id, config)
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if not files:
            where = self.folder if self.folder is not None else self.hub_id
            raise BenchmarkError(f"config '{config}' not found in {where} (no {config}/*.parquet); "
                                 f"available: {', '.join(self.available()) or 'none'}")
        try:
            rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise BenchmarkError(f"cannot read {folder}: {exc}; is it a parquet file?") from None
        for row in rows:
            for key, kind in _NESTED.items():
                if isinstance(row.get(key), str):
                    row[key] = parse_json_cell(row[key], config, key, row.get("ID"), kind)
            for key, kind in _JSON_CHECKED.items():
                if isinstance(row.get(key), str):
                    parse_json_cell(row[key], config, key, row.get("ID"), kind)
        return rows

    def __repr__(self) -> str:
        return f"Benchmark({self.name!r})"


def _hub_folder(hub_id: str, config: str) -> Path:
    """Download one config of the hub dataset (needs network; never called by the tests)."""
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo_id=hub_id, repo_type="dataset", allow_patterns=[f"{config}/*"])
    except Exception as exc:  # offline, gated, or a typo: one line, with the fix
        raise BenchmarkError(f"cannot download {hub_id}/{config} ({exc.__class__.__name__}); "
                             "check the network, or pass a local copy as mllmu-bench:<folder>") from None
    return Path(root) / config


@lru_cache(maxsize=4)
def _toyworld(seed: int) -> dict:
    from .world import build_world

    return build_world(seed).configs


def open_benchmark(source: str = "toyworld") -> Benchmark:
    """Open ``toyworld[:seed]``, ``mllmu-bench``, ``mllmu-bench:<folder>``, a folder in the hub layout, or
    ``clear`` / ``clear:<folder>`` (CLEAR's files, :func:`mlunlearn.benchmarks.clear.open_clear`)."""
    if source == "toyworld" or source.startswith("toyworld:"):
        seed = source.partition(":")[2] or "0"
        if not seed.isdigit():
            raise BenchmarkError(f"bad toyworld seed {seed!r}; use toyworld or toyworld:<integer>")
        return Benchmark(source, configs=_toyworld(int(seed)))
    if source == "mllmu-bench":
        return Benchmark(source, hub_id=HUB_ID)
    if source == "clear" or source.startswith("clear:"):  # CLEAR's configs, checked against its columns
        from mlunlearn.benchmarks.clear import open_clear

        return open_clear(source)
    folder = Path(source.split(":", 1)[1] if source.startswith("mllmu-bench:") else source).expanduser()
    if not folder.is_dir():
        raise BenchmarkError(f"no benchmark folder at {folder}; use toyworld, mllmu-bench, or mllmu-bench:<folder> "
                             "holding {config}/train-*.parquet")
    return Benchmark(source, folder=folder)


# How ``datasets`` stores an ``Image``: the PNG bytes and an optional path (a string even when it is empty).
_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _image_storage(f: pa.Field) -> pa.Field:
    """The ``image`` / ``images`` (Test_Set's views) columns in ``datasets``' Image storage type."""
    if f.name == "image":
        return pa.field(f.name, _IMAGE_TYPE)
    if f.name == "images":
        return pa.field(f.name, pa.list_(_IMAGE_TYPE))
    return f


def hf_features(schema: pa.Schema) -> dict:
    """The Hugging Face ``datasets`` features of a table, as the JSON ``datasets`` stores in parquet files.

    ``datasets`` reads the schema metadata key ``huggingface`` to know that an image column of
    ``{bytes, path}`` structs is an ``Image`` (decoded to PIL), not a plain struct; the hub's parquet
    files carry it. Lists are written in the legacy ``[feature]`` form, which every ``datasets``
    version reads.
    """

    def feature(kind: pa.DataType) -> object:
        if kind == _IMAGE_TYPE:
            return {"_type": "Image"}
        if pa.types.is_struct(kind):
            return {kind.field(i).name: feature(kind.field(i).type) for i in range(kind.num_fields)}
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            return [feature(kind.value_type)]
        dtype = "string" if pa.types.is_string(kind) or pa.types.is_large_string(kind) else str(kind)
        return {"dtype": dtype, "_type": "Value"}

    return {f.name: feature(f.type) for f in schema}


def write_benchmark(configs: dict, folder, names=None) -> Path:
    """Write configs as ``{folder}/{config}/train-00000-of-00001.parquet`` (the hub layout), with the
    Hugging Face features metadata, so ``datasets.load_dataset`` decodes the images as the hub's do."""
    folder = Path(folder)
    for name in names or list(configs):
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(configs[name])
        table = table.cast(pa.schema([_image_storage(f) for f in table.schema]))
        meta = {b"huggingface": json.dumps({"info": {"features": hf_features(table.schema)}}).encode()}
        pq.write_table(table.replace_schema_metadata(meta), out / "train-00000-of-00001.parquet")
    return folder
