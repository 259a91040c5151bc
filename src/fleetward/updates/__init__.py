"""Updates: each tenant's TUF image repository, the director, deployments and their rollouts (ADR 0015).

- ``repository.py``: the pure core of the image repository over python-tuf's metadata API (build, sign,
  verify roots, expiry policy); no I/O.
- ``images.py``: the shell that keeps keys (sealed), metadata versions and images in the store, publishes
  new versions and answers what devices and operators ask.
- ``models.py``: the records the shells hand out (:class:`~fleetward.updates.models.Image`).
"""
