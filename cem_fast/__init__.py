"""cem_fast: fast Causal Effect Maps for image-restoration networks.

>>> import cem_fast
>>> res = cem_fast.causal_effect_map(model, "image.png", task="DN", sigma=50, roi=(152, 96, 32))
>>> res.cem            # (rows, cols) dB, + helps the ROI, - hurts it
>>> res.save("out/")   # result.npz, summary.json, cem.png, pie.png, ...
"""
__version__ = "0.1.0"

from .estimator import causal_effect_map, causal_effect_maps, load_image  # noqa: E402
from .geometry import ROI, BlockGrid  # noqa: E402
from .models import load_model  # noqa: E402
from .compare import compare_models, difference  # noqa: E402
from .ops import intervene, roi_psnr, roi_sq_err, roi_sq_err_multi  # noqa: E402
from .reference import roi_grid  # noqa: E402
from .patches import PatchBank, load_patch_bank  # noqa: E402
from .result import CEMResult, CEMResults  # noqa: E402
from .tasks import CustomTask, Denoise, Derain, Identity, SuperResolution, Task, make_task  # noqa: E402

__all__ = ["causal_effect_map", "compare_models", "difference", "load_image", "ROI", "BlockGrid", "load_model", "intervene", "roi_psnr",
           "roi_sq_err", "roi_sq_err_multi", "roi_grid", "PatchBank", "load_patch_bank", "CEMResult", "CEMResults", "causal_effect_maps", "Task", "CustomTask", "Denoise", "Derain",
           "Identity", "SuperResolution", "make_task", "__version__"]
