"""nn.Modules of the engine: LiteMedSAM (TinyViT + SAM heads) and SAM-UNet (SAM ViT-B + ResNet, U-Net fusion).

Modules only: no file IO, weights registry or numpy preprocessing (see samunet_core.predictor for those).
Import the submodules directly (`from samunet_core.modeling.samunet import build_samunet`); they import torch.
`segment_anything.modeling` is reached through `sam_parts.sam_modeling()`, which avoids the package's torchvision
dependency.
"""
