"""MRML logic of the SAMUNetSlicer module: slicer, vtk, numpy and samunet_core only, never Qt.

The Qt widget in SAMUNetSlicer.py and a possible web front end drive the same classes:
geometry (RAS -> displayed slice), prompts (markups observers), masking and writer (Segment Editor semantics, undo,
provenance), interactive (the prompt -> model -> segment loop), propagation and batch.
"""
