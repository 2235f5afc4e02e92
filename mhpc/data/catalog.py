"""Names of the synthetic benchmark's textures and defect kinds: a leaf module with no heavy imports, so the
command line can offer them as choices without loading torch (``mhpc --help`` stays instant)."""

from mhpc.data.textures import ETR_TEXTURES

TEXTURES = ("brick", "grass", "gravel")  # scikit-image (the demo)
ETR_CATEGORIES = tuple(ETR_TEXTURES)  # Extreme Tux Racer photographs
ALL_TEXTURES = TEXTURES + ETR_CATEGORIES
DEFECT_KINDS = ("scratch", "crack", "stain", "hole", "foreign", "blur")  # the demo's
EXTRA_DEFECT_KINDS = ("warp", "speckle", "discolour", "grain")
ALL_DEFECT_KINDS = DEFECT_KINDS + EXTRA_DEFECT_KINDS
DEFAULT_DIFFICULTY = 0.3  # calibrated: baseline MobileNetV2 mean image AUROC ~0.89 (target 0.80-0.97)
