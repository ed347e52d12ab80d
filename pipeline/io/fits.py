"""Small FITS helpers: read an image HDU as native float32, write an HDU list atomically.

astropy returns big-endian arrays that ``torch.from_numpy`` refuses; :func:`read_image_hdu` is the
one place that converts them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from pipeline.errors import InputFileError
from pipeline.io.atomic import atomic_file


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "FITS file not found")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(path, memmap=False)
            hdul.verify("exception")
    except Exception as exc:  # astropy raises many types for truncated/garbled files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputFileError(path, f"not a readable FITS file ({msg})") from None
    for w in caught:  # astropy only *warns* about a truncated last HDU
        text = str(w.message)
        if "corrupted" in text or "truncated" in text or "not multiple of 2880" in text:
            hdul.close()
            raise InputFileError(path, "truncated or corrupted FITS file")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return hdul


def hdu_names(path) -> list[str]:
    """Extension names of the HDUs in ``path`` (PRIMARY first)."""
    with _open(path) as hdul:
        return [h.name for h in hdul]


def read_image_hdu(path, name: str, dtype=np.float32, header: bool = False):
    """The data of image HDU ``name`` as a native-endian array of ``dtype`` (default float32).

    With ``header=True`` returns ``(array, header)``. A missing file, a missing HDU or an HDU without
    image data raises a one-line :class:`InputFileError` naming the file and the HDU.
    """
    with _open(path) as hdul:
        names = [h.name for h in hdul]
        if name.upper() not in names:
            raise InputFileError(path, f"no HDU named {name!r} (HDUs: {', '.join(names)})", field=name)
        hdu = hdul[name]
        try:
            data = hdu.data
        except Exception as exc:
            raise InputFileError(path, f"cannot read data ({exc})", field=name) from None
        if data is None or not isinstance(data, np.ndarray) or data.dtype.fields is not None:
            raise InputFileError(path, "HDU holds no image data", field=name)
        arr = np.ascontiguousarray(data, dtype=np.dtype(dtype).newbyteorder("="))
        hdr = hdu.header.copy()
    if not np.all(np.isfinite(arr)):
        raise InputFileError(path, "image contains NaN or infinite values", field=name)
    return (arr, hdr) if header else arr


def read_header(path, name: str = "PRIMARY") -> fits.Header:
    with _open(path) as hdul:
        if name.upper() not in [h.name for h in hdul]:
            raise InputFileError(path, f"no HDU named {name!r}", field=name)
        return hdul[name].header.copy()


def write_fits_atomic(path, hdul: fits.HDUList | list) -> Path:
    """Write ``hdul`` to ``path`` with checksums via a temp file in the same directory + rename
    (:mod:`pipeline.io.atomic`), so readers never see a partial file and a failure leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(hdul, fits.HDUList):
        hdul = fits.HDUList(list(hdul))
    with atomic_file(path) as tmp:
        hdul.writeto(tmp, overwrite=True, checksum=True)
    return path


def open_fits(path) -> fits.HDUList:
    """Open and verify a FITS file (caller closes it); one-line InputFileError if missing/unreadable."""
    return _open(path)
