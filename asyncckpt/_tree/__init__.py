"""The tree layer: what a state tree may hold, its spec, and how it is rebuilt on restore.

One module per concern: ``_spec`` (flatten a tree into a spec plus numpy arrays; validate a
read spec), ``_rebuild`` (check ``into=``, rebuild the tree), ``_select`` (the parts of a
tree ``paths=`` and ``partial=`` restore), ``_containers`` (Mappings, dataclasses,
namedtuples), ``_objects`` (state_dict() objects, random generators), ``_dtypes``
(ml_dtypes' names), ``_torch`` and ``_jax`` (their arrays; ``_torch`` also holds the torch
calls that copy a tensor off a CUDA device, since only it may import torch). Knows nothing
of files, pooled buffers or scheduling; torch and jax are imported only where a tree holds
them.
"""

from __future__ import annotations

from ._dtypes import EXTENSION_ITEMSIZES as EXTENSION_ITEMSIZES
from ._dtypes import extension_dtype as extension_dtype
from ._dtypes import extension_name as extension_name
from ._dtypes import install_advice as install_advice
from ._dtypes import name_in_file as name_in_file
from ._dtypes import raw_dtype as raw_dtype
from ._rebuild import build as build
from ._rebuild import check_into_array as check_into_array
from ._rebuild import match_into as match_into
from ._select import Part as Part
from ._select import array_indices as array_indices
from ._select import build_parts as build_parts
from ._select import check_selection as check_selection
from ._select import graft as graft
from ._select import is_within as is_within
from ._select import present as present
from ._select import select as select
from ._select import without as without
from ._spec import ARRAY_TAGS as ARRAY_TAGS
from ._spec import MAX_DEPTH as MAX_DEPTH
from ._spec import AddDeviceLeaf as AddDeviceLeaf
from ._spec import AddLeaf as AddLeaf
from ._spec import ArrayLeaf as ArrayLeaf
from ._spec import DeviceLeaves as DeviceLeaves
from ._spec import Key as Key
from ._spec import Spec as Spec
from ._spec import TreePath as TreePath
from ._spec import byte_view as byte_view
from ._spec import flatten as flatten
from ._spec import format_path as format_path
from ._spec import iter_array_refs as iter_array_refs
from ._torch import CudaCopier as CudaCopier
from ._torch import DeviceTensor as DeviceTensor
from ._torch import distributed_store as distributed_store
from ._torch import host_array as host_array
from ._torch import host_tensor as host_tensor

__all__ = [
    "ARRAY_TAGS",
    "EXTENSION_ITEMSIZES",
    "MAX_DEPTH",
    "AddDeviceLeaf",
    "AddLeaf",
    "ArrayLeaf",
    "CudaCopier",
    "DeviceLeaves",
    "DeviceTensor",
    "Key",
    "Part",
    "Spec",
    "TreePath",
    "array_indices",
    "build",
    "build_parts",
    "byte_view",
    "check_into_array",
    "check_selection",
    "distributed_store",
    "extension_dtype",
    "extension_name",
    "flatten",
    "format_path",
    "graft",
    "install_advice",
    "is_within",
    "iter_array_refs",
    "match_into",
    "name_in_file",
    "present",
    "raw_dtype",
    "select",
    "without",
]
