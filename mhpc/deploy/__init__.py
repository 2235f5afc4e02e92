"""Deploying a fitted model: export (needs torch) and a torch-free engine (onnxruntime / OpenVINO).

``from mhpc.deploy import DeployedModel`` imports no torch; ``mhpc.deploy.export`` does.
"""

from mhpc.deploy.contract import load_image, preprocessing_contract, read_sidecar, sidecar_path
from mhpc.deploy.engine import DeployedModel, DeployResult

__all__ = ["DeployedModel", "DeployResult", "load_image", "preprocessing_contract", "read_sidecar", "sidecar_path"]
