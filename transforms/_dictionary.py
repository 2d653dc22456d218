"""The dictionary (``...d``) form shared by every transform that maps (image, meta) to (image, meta)."""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

from monai.transforms import MapTransform

__all__ = ["dictionary_form", "meta_key"]


def meta_key(key: Hashable) -> str:
    """Where the dictionary forms keep the metadata of ``data[key]``."""
    return f"{key}_meta_dict"


def dictionary_form(array_transform: type) -> type:
    """Make the MONAI ``MapTransform`` of an array transform ``(image, meta) -> (image, meta)``.

    The returned class takes ``keys`` and ``allow_missing_keys`` and passes every other
    argument to ``array_transform``.
    """

    class Dictionary(MapTransform):
        def __init__(self, keys: str | Sequence[str], *args: Any, allow_missing_keys: bool = False, **kwargs: Any) -> None:
            super().__init__(keys, allow_missing_keys)
            self.transform = array_transform(*args, **kwargs)

        def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
            d = dict(data)
            for key in self.key_iterator(d):
                d[key], d[meta_key(key)] = self.transform(d[key], d[meta_key(key)])
            return d

    Dictionary.__name__ = Dictionary.__qualname__ = array_transform.__name__ + "d"
    Dictionary.__module__ = array_transform.__module__
    Dictionary.__doc__ = f"Dictionary form of :class:`{array_transform.__name__}`; metadata under ``f'{{key}}_meta_dict'``."
    return Dictionary
