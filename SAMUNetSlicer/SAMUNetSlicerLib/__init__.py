"""MRML logic of the SAMUNetSlicer module: slicer, vtk, numpy and samunet_core only, never Qt.

The Qt widget in SAMUNetSlicer.py, `replay` and a possible web front end drive the same classes: controller (markups
events -> the engine's prompt policy on the session worker -> writes on the main thread), geometry (views, RAS ->
displayed slice), prompts (markups -> world RAS), masking and writer (Segment Editor semantics, undo, provenance),
batch (the prompts on every loaded volume), models (what the model list offers), views (slice-view behaviour).
"""
