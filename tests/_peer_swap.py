"""pytest plugin (``-p _peer_swap``) that runs diffusers' own scheduler tests on fastdiff's classes.

At configure time, before any test module is imported, every name fastdiff.diffusers exports is
replaced in `diffusers` and `diffusers.schedulers` by fastdiff's class, so the suite's
``from diffusers import DDIMScheduler`` (and diffusers' own `compatibles` lookups) get fastdiff's.
After collection it writes, to $FASTDIFF_PEER_REPORT, which scheduler classes each collected
test class uses (module and name): tests/test_diffusers_peer.py checks from it that the swap
took effect. Without FASTDIFF_PEER_SWAP=1 it swaps nothing (the stock run) but still reports.
"""

from __future__ import annotations

import json
import os


def pytest_configure(config):
    if os.environ.get("FASTDIFF_PEER_SWAP") != "1":
        return
    import diffusers
    import diffusers.schedulers

    import fastdiff.diffusers as fused

    for name in fused.__all__:
        cls = getattr(fused, name)
        setattr(diffusers, name, cls)
        setattr(diffusers.schedulers, name, cls)


def pytest_collection_modifyitems(session, config, items):
    path = os.environ.get("FASTDIFF_PEER_REPORT")
    if not path:
        return
    used = {}
    for item in items:
        owner = getattr(item, "cls", None)
        classes = list(getattr(owner, "scheduler_classes", ()) or ())
        if getattr(owner, "scheduler_class", None) is not None:  # (FlowMapEuler's test class)
            classes.append(owner.scheduler_class)
        for cls in classes:
            used.setdefault(f"{owner.__module__}.{owner.__name__}", set()).add(
                f"{cls.__module__}:{cls.__name__}")
    with open(path, "w") as f:
        json.dump({k: sorted(v) for k, v in used.items()}, f, indent=1)
