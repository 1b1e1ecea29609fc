"""Old name of the fast network, kept so existing imports keep working: ``network="dummy"``
builds `FingerprintNetwork` (see `lorainv.impl.fingerprint_net`)."""

from lorainv.impl.fingerprint_net import FingerprintNetwork as DummyNetwork

__all__ = ["DummyNetwork"]
