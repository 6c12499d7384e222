"""Reading volumes and images, writing segmentations (.seg.nrrd, NIfTI, PNG, DICOM SEG); all writes are atomic."""
