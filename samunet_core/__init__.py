"""SAMUNetSlicer engine: prompt-based medical image segmentation (SAM-UNet, LiteMedSAM).

Pure Python + torch; never imports slicer, qt or vtk. Heavy modules (torch, models) are imported lazily by the
functions that need them, so `import samunet_core` stays cheap.
"""

__version__ = "0.1.0"
