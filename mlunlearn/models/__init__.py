"""Models: the tiny LLaVA and the one entry point that loads it or a real LLaVA-1.5 (book chapter 1)."""

from .loading import ModelLoadError, load_model, parameter_counts
from .safety import SafetyRecipe, train_safety_vanilla
from .shaped import build_llava_1_5_shaped
from .tiny import TinySizes, build_processor, build_tiny_llava, train_tokenizer
from .vanilla import ASSET_DIR, Recipe, load_vanilla, train_vanilla

__all__ = [
    "ASSET_DIR", "ModelLoadError", "Recipe", "SafetyRecipe", "TinySizes", "build_llava_1_5_shaped", "build_processor",
    "build_tiny_llava",
    "load_model", "load_vanilla", "parameter_counts", "train_safety_vanilla", "train_tokenizer", "train_vanilla",
]
