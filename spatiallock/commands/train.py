"""`spatiallock train base|adapter|decoder|detector|locator|lama`: the small base model, the SpatialLock adapters,
a base's sharper decoder, the shapes detector, the location model, the LAMA baseline.

Each kind is a module of its own (`train_base`, `train_adapter`, ...: its help, its options and the function that
runs it); `train_common` holds what they share.
"""

from __future__ import annotations

from spatiallock.commands import train_adapter, train_base, train_decoder, train_detector, train_lama, train_locator


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train the small base model, its decoder, an adapter, the shapes detector, the locator or LAMA",
    )
    sub = train.add_subparsers(dest="train_command", metavar="<what>", required=True)
    for kind in (train_base, train_adapter, train_decoder, train_detector, train_locator, train_lama):
        kind.register(sub)
