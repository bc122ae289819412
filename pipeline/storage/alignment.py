"""Rows of several files aligned by sample id: the reference row order (the manifest's or the
first cache's), split names as codes, and what keeps a cache from aligning to a reference,
named by sample. Used to fuse caches (`fused`) and to verify one (`feature_cache`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.splits import SPLITS  # split code i means SPLITS[i]
from pipeline.errors import CacheError
from pipeline.storage import rowstore
from pipeline.storage.rowstore import check_unique, ids_to_bytes


def split_codes(split: np.ndarray, where) -> np.ndarray:
    """(n,) uint8 split codes (index into SPLITS) of ``split``: names or codes already."""
    if split.dtype.kind in "iu":
        codes = split
    else:
        lookup = {name: code for code, name in enumerate(SPLITS)}
        try:
            codes = np.array([lookup[str(s)] for s in split.tolist()], dtype=np.int64)
        except KeyError as e:
            raise CacheError(f"{where}: split {e.args[0]!r} is not one of {SPLITS}") from None
    if ((codes < 0) | (codes >= len(SPLITS))).any():
        raise CacheError(f"{where}: split codes must be in [0, {len(SPLITS)}) for {SPLITS}")
    return codes.astype(np.uint8)


def _id_difference(ids: np.ndarray, where, ref_ids: np.ndarray, ref_where) -> str | None:
    """Counts and one example of ids found on one side only, or None if the sets are equal."""
    parts = []
    for a, a_where, b, b_where in (
        (ref_ids, ref_where, ids, where),
        (ids, where, ref_ids, ref_where),
    ):
        only = np.flatnonzero(rowstore.rows_for(b, a) < 0)
        if len(only):
            parts.append(
                f"{len(only)} of the {len(a)} ids in {a_where} are missing from {b_where} "
                f"(e.g. {a[only[0]].decode()})"
            )
    return "different samples: " + "; ".join(parts) if parts else None


def _disagreement(name, ref, ref_where, got, where, ids: np.ndarray) -> str | None:
    """First sample whose label / split code differs between two aligned arrays (N,)."""
    bad = np.flatnonzero(ref != got)
    if not len(bad):
        return None
    i = bad[0]
    show = (lambda c: SPLITS[c]) if name == "split" else int
    return (
        f"sample {ids[i].decode()} has {name} {show(ref[i])!r} in {ref_where} but "
        f"{show(got[i])!r} in {where} ({len(bad)} samples differ)"
    )


@dataclass(frozen=True)
class Reference:
    """The row order everything is aligned to: the manifest's, or the first cache's."""

    sample_id: np.ndarray  # (N,) S64
    label: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) uint8 codes
    sha256: str
    where: str

    @classmethod
    def of(cls, manifest=None, head=None) -> Reference:
        """The manifest's rows, or else those of ``head`` (a `feature_cache.CacheHeader`,
        not imported: the feature cache imports this module)."""
        if manifest is None:
            ref = cls(head.sample_id, head.label, head.split, head.attrs["manifest_sha256"],
                      str(head.path))  # fmt: skip
        else:
            ref = cls(
                ids_to_bytes(np.asarray(manifest.sample_id), "the manifest"),
                np.asarray(manifest.label, np.int64),
                split_codes(np.asarray(manifest.split), "the manifest"),
                str(manifest.sha256),
                "the manifest",
            )
            if not len(ref.sample_id) == len(ref.label) == len(ref.split):
                raise CacheError("the manifest's sample_id, label and split differ in length")
        check_unique(ref.sample_id, ref.where)  # caches in the same order need no check
        return ref

    def problems(self, head) -> tuple[list[str], np.ndarray | None]:
        """What keeps `head` (a `feature_cache.CacheHeader`) from aligning to this reference,
        and its rows in reference order (None when they are already in it)."""
        found = []
        if head.attrs["manifest_sha256"] != self.sha256:
            found.append(
                f"{head.path} was extracted from manifest {head.attrs['manifest_sha256']} but "
                f"{self.where} is manifest {self.sha256}; re-extract it"
            )
        if np.array_equal(head.sample_id, self.sample_id):
            rows = None  # the common case: no lookup, no permutation
        else:
            check_unique(head.sample_id, head.path)
            rows = rowstore.rows_for(head.sample_id, self.sample_id)
            diff = _id_difference(head.sample_id, head.path, self.sample_id, self.where)
            if diff:
                return [*found, diff], None
        take = slice(None) if rows is None else rows
        for name, ref, got in (
            ("label", self.label, head.label),
            ("split", self.split, head.split),
        ):
            msg = _disagreement(name, ref, self.where, got[take], head.path, self.sample_id)
            if msg:
                found.append(msg)
        return found, rows
