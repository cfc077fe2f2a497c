"""zoomfeat: ZoomLDM multi-magnification features and MIL evaluation for whole-slide images.

Importing the package is cheap: heavy libraries (torch, openslide, the HDF5 library) are imported by the modules
that need them, never here.
"""

__version__ = "0.1.0"
