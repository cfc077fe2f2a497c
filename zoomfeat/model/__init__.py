"""ZoomLDM in the official state_dict layout: config reader, model, loader (see docs/ARCHITECTURE.md, "zoomfeat.model").

``from zoomfeat.model import load_zoomldm``; importing this package imports torch.
"""

from zoomfeat.model.config import ZoomLDMConfig, read_config
from zoomfeat.model.samplers import SAMPLERS
from zoomfeat.model.zoomldm import ZoomLDM, build_zoomldm, load_zoomldm

__all__ = ["SAMPLERS", "ZoomLDM", "ZoomLDMConfig", "build_zoomldm", "load_zoomldm", "read_config"]
