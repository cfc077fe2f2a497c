"""The store: every on-disk artifact of zoomfeat is written and read here (h5py is imported only here).

* :mod:`zoomfeat.store.files`: the one atomic write (:func:`atomic_write` / :func:`commit_file`), the slide
  :func:`fingerprint`, the one settings comparison (:func:`settings_diff`) and the check every output folder
  gets (:func:`check_output_folder`).
* :mod:`zoomfeat.store.tiles`: tile and feature files, one HDF5 file per slide (docs/formats.md):
  :class:`TileStoreWriter`, the one reader :class:`FeatureFile`, :func:`verify_file`, and
  :func:`slide_tile_grid`, the one way a command gets a slide's tile grid (the stored one, or a fresh one).
* :mod:`zoomfeat.store.trainset`: the ZoomLDM training-set format of ``prepare-train`` / ``train``.
* :mod:`zoomfeat.store.claims`: per-slide claims shared by concurrent runs on one folder.
* :mod:`zoomfeat.store.records`: per-shard error records merged into ``errors.csv``.
"""

from zoomfeat.store.claims import Claim
from zoomfeat.store.files import (OutputError, atomic_write, check_output_folder, check_record, commit_file,
                                  describe_diff, fingerprint, make_folder, output_error, same_file, settings_diff,
                                  temp_path, write_json_atomic, write_text)
from zoomfeat.store.records import ERRORS_CSV, merged_errors, read_errors, record_tag, update_records, write_errors
from zoomfeat.store.tiles import (FORMAT, FORMAT_VERSION, REQUIRED_ATTRS, FeatureFile, TileStoreWriter,
                                  feature_width, h5_path, is_complete, is_complete_with, read_attrs, read_features,
                                  read_grid, slide_tile_grid, verify_dir, verify_file, write_feature_file)

__all__ = [
    "Claim", "ERRORS_CSV", "FORMAT", "FORMAT_VERSION", "FeatureFile", "OutputError", "REQUIRED_ATTRS",
    "TileStoreWriter", "atomic_write", "check_output_folder", "check_record", "commit_file", "describe_diff",
    "feature_width", "fingerprint", "h5_path", "is_complete", "is_complete_with", "make_folder", "merged_errors",
    "output_error", "read_attrs", "read_errors", "read_features", "read_grid", "record_tag", "same_file",
    "settings_diff", "slide_tile_grid", "temp_path", "update_records", "verify_dir", "verify_file", "write_errors",
    "write_feature_file", "write_json_atomic", "write_text",
]
