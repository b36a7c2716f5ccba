"""mlunlearn: machine unlearning for multimodal LLMs (LLaVA-1.5), the companion package of the book.

``mlunlearn.data`` (the synthetic world and the MLLMU-Bench loader), ``mlunlearn.models`` (the tiny LLaVA
and ``load_model``), ``mlunlearn.eval`` (MLLMU-Bench's protocol); chapter 1 introduces all three.
"""

__version__ = "0.1.0"
