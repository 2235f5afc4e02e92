"""Ray for the fit (optional extra: ``pip install 'mhpc[distributed]'``; Ray is imported lazily, so the
core package imports and works without it): a Ray session, path shards, and the fit driver's Ray
executor.

``fit_distributed(model, ...)`` (``MHPatchCore.fit_distributed`` and ``mhpc fit --ray`` call it) runs the
fit driver's one schedule (``mhpc.fit.driver``) with :class:`RayExecutor`, which splits the image *paths*
into contiguous shards, sends only paths, and runs each pass of ``mhpc.fit.passes`` as one task per
shard. Tasks return the same mergeable states a single-process fit accumulates (``mhpc.fit.state``); the
driver merges them in shard order, finalises the projection, puts it in the object store for the bank
tasks, and finalises the bank. The driver sees no patch feature, only states, except with aggregation
NONE, whose bank is the patches themselves: the statistics tasks return them, so every image is read
once. The images are streamed whatever the algorithm (no shard is held in memory). The tasks build their
model with the driver's model class, passed to them, so this module sits below the model class
(tests/test_layering.py). Scoring on Ray is in :mod:`mhpc.distributed`.

Determinism: a task is a pure function of (configuration, paths, projection), and the driver merges
results in shard order, not completion order. A task whose worker dies is re-run by Ray
(``max_retries``) and gives the same state, so the model does not change.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mhpc.errors import MHPCError

if TYPE_CHECKING:
    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.fit.state import FitState


def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MHPCError("Ray is not installed; install the extra: pip install 'mhpc[distributed]'") from None
    return ray


DEFAULT_RAY_TIMEOUT = 30.0  # seconds to reach a Ray address before giving up (mhpc's --ray-timeout)


def check_ray_address(address: str | None, timeout: float = DEFAULT_RAY_TIMEOUT) -> None:
    """One-line error when nothing answers at ``address`` ("HOST:PORT" or "ray://HOST:PORT") within
    ``timeout`` seconds. Ray itself retries an unreachable address for minutes; a TCP connection to it is
    tried first. None (a new local Ray) and "auto" (Ray finds the address itself) are not probed."""
    import math
    import socket

    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise MHPCError(f"--ray-timeout must be a positive number of seconds, got {timeout!r}")
    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MHPCError(f"--ray {address}: expected 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise MHPCError(f"cannot reach Ray at {address} within {timeout:g} s ({reason}); "
                        "is the cluster running there? (--ray-timeout sets the wait)") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, timeout: float = DEFAULT_RAY_TIMEOUT) -> Iterator[Any]:
    """Joins ``address`` ("auto", "HOST:PORT" or "ray://HOST:PORT"), or starts a local Ray when None.
    A Ray already initialised in this process is used as it is and left running; one started here is
    shut down at the end. An address that does not answer within ``timeout`` s is a one-line error.

    ``ray.init`` replaces the SIGTERM handler with ``sys.exit(15)``; the caller's handler is put back
    (mhpc's CLI treats SIGTERM like Ctrl-C: clean up, exit 130), and a SIGTERM that arrives while Ray
    starts is raised as KeyboardInterrupt too, so the ``finally`` below shuts Ray down either way."""
    import signal
    import threading

    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    check_ray_address(address, timeout)
    main_thread = threading.current_thread() is threading.main_thread()
    term_handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        # "local": a new instance even when RAY_ADDRESS is set or another cluster runs on this machine.
        ray.init(address=address or "local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        _restore(signal, term_handler)
        raise MHPCError(f"cannot connect to Ray at {address or 'a new local instance'}: {exc}") from None
    except SystemExit as exc:  # Ray's own SIGTERM handler fired while it started
        _restore(signal, term_handler)
        ray.shutdown()
        if exc.code == signal.SIGTERM and term_handler not in (None, signal.SIG_DFL, signal.SIG_IGN):
            raise KeyboardInterrupt from None
        raise
    _restore(signal, term_handler)
    try:
        yield ray
    finally:
        ray.shutdown()


def _restore(signal: Any, handler: Any) -> None:
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)


def shard_paths(paths: Sequence[str], num_shards: int) -> list[list[str]]:
    """Contiguous shards whose sizes differ by at most one; shard order is input order."""
    if int(num_shards) < 1:
        raise MHPCError(f"num_shards must be >= 1, got {num_shards}")
    if not paths:
        raise MHPCError("no training images were given")
    bounds = np.linspace(0, len(paths), min(int(num_shards), len(paths)) + 1).round().astype(int)
    return [list(paths[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def resolve_image_paths(images: Sequence[str | os.PathLike] | tuple[str | os.PathLike, str]) -> list[str]:
    """A list of image files, or an MVTec ``(root, category)`` pair (its good training images)."""
    from mhpc.data.datasets import mvtec_samples

    if isinstance(images, tuple) and len(images) == 2 and Path(images[0]).is_dir() \
            and (Path(images[0]) / str(images[1])).is_dir():
        return [str(s.image) for s in mvtec_samples(images[0], str(images[1]), "train")]
    paths = [str(p) for p in images]
    for p in paths:
        if not Path(p).is_file():
            raise MHPCError(f"training image not found: {p}")
    return paths


def image_batches(paths: Sequence[str], preprocessing: dict[str, Any], batch_size: int):
    """A loader over image files with a preprocessing dict (``mhpc.data.transforms``), the same code the
    single-process ``mhpc fit``/``predict`` use."""
    from mhpc.data.datasets import Sample, SampleDataset, make_loader

    samples = [Sample(Path(p), None, False, "") for p in paths]
    return make_loader(SampleDataset(samples, preprocessing), batch_size)


# ---------------------------------------------------------------- fit
_WORKER_MODEL: dict[str, Any] = {}  # one built model per worker process, reused by its later tasks


def _worker_model(model_cls: type, config: dict[str, Any], fingerprint: str) -> "MHPatchCore":
    """The model a task works with: built from the driver's configuration (the backbone comes from the
    node's own weights cache), and refused when its weights differ from the driver's. A task only sets
    its projection stages, which every bank task sends. ``model_cls``: the driver's model class (Ray sends
    it by reference), so this module never imports the model it runs."""
    import json

    from mhpc.core.backbones import state_fingerprint

    key = json.dumps(config, sort_keys=True)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()
        model = model_cls(**config).begin_fit()
        if state_fingerprint(model.feature_extractor_) != fingerprint:
            raise MHPCError(f"this Ray node loads different {model.backbone_.value} weights than the driver "
                            f"(pretrained={model.pretrained}, weights_path={model.weights_path})")
        _WORKER_MODEL[key] = model
    return _WORKER_MODEL[key]


def _statistics_task(model_cls: type, config: dict[str, Any], fingerprint: str, preprocessing: dict[str, Any], paths: list[str],
                     batch_size: int, keep: str | None) -> "FitState":
    """One shard's statistics pass (mhpc.fit.passes)."""
    from mhpc.fit import passes

    model = _worker_model(model_cls, config, fingerprint)
    return passes.statistics_pass(model, image_batches(paths, preprocessing, batch_size), keep)


def _bank_task(model_cls: type, config: dict[str, Any], fingerprint: str, preprocessing: dict[str, Any],
               projection: dict[str, torch.Tensor], paths: list[str], batch_size: int, n_images: int,
               alone: bool) -> "FitState":
    """One shard's bank pass in the driver's projection (mhpc.fit.passes)."""
    from mhpc.fit import passes
    from mhpc.fit.driver import set_stage_tensors

    model = set_stage_tensors(_worker_model(model_cls, config, fingerprint), projection)
    return passes.bank_pass(model, image_batches(paths, preprocessing, batch_size), n_images=n_images, alone=alone)


def _in_order(ray: Any, refs: list, desc: str, progress: bool) -> Iterator[Any]:
    """Task results in shard order, one at a time: the driver holds one shard's state besides the merged
    one, and the merge order (hence the rounding) does not depend on which task finished first."""
    from tqdm.auto import tqdm

    for i in tqdm(range(len(refs)), desc=desc, unit="shard", disable=not progress, leave=False):
        ref, refs[i] = refs[i], None  # the driver's reference goes as soon as the state is merged
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, MHPCError):  # a user mistake in a task (unreadable image...): one line
                raise MHPCError(str(exc.cause)) from None
            raise
        except ray.exceptions.RayError as exc:  # retries used up (worker or node lost every time)
            raise MHPCError(f"shard {i + 1} of {len(refs)} failed on Ray after its retries: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        yield result


class RayExecutor:
    """The fit driver's executor on Ray (mhpc.fit.driver): one task per shard of image paths, results
    gathered in shard order. The driver never sees a patch feature, only the states (aggregation NONE:
    the kept patches, which are the bank)."""

    def __init__(self, ray: Any, model: "MHPatchCore", shards: list[list[str]], preprocessing: dict[str, Any],
                 batch_size: int, max_retries: int) -> None:
        from mhpc.core.backbones import state_fingerprint

        self.ray, self.shards, self.pre, self.batch_size = ray, shards, preprocessing, batch_size
        self.num_shards = len(shards)
        self.n_images = sum(len(shard) for shard in shards)
        self.options = dict(num_cpus=1, max_retries=int(max_retries), retry_exceptions=False)
        if model.device_.type == "cuda":
            self.options["num_gpus"] = 1
        self.model_cls = type(model)
        self.config = ray.put({**model.get_config(), "progress": False})
        self.fingerprint = state_fingerprint(model.feature_extractor_)

    def _map(self, fn: Any, args: list[tuple], desc: str, progress: bool) -> list[Any]:
        task = self.ray.remote(**self.options)(fn)
        refs = [task.remote(self.model_cls, self.config, self.fingerprint, self.pre, *a) for a in args]
        return list(_in_order(self.ray, refs, f"Ray {desc}", progress))

    def statistics(self, model: "MHPatchCore", keep: str | None, fit_pca: bool, desc: str) -> list["FitState"]:
        args = [(shard, self.batch_size, keep) for shard in self.shards]
        return self._map(_statistics_task, args, desc, model.progress)

    def bank(self, model: "MHPatchCore", resume: Any, desc: str) -> list["FitState"]:
        from mhpc.fit.driver import stage_tensors

        if resume is not None:
            raise MHPCError("update runs in-process; a Ray fit starts from scratch")
        projection = self.ray.put(stage_tensors(model))
        args = [(projection, shard, self.batch_size, self.n_images, self.num_shards == 1) for shard in self.shards]
        return self._map(_bank_task, args, desc, model.progress)


def fit_distributed(model: "MHPatchCore", images: Sequence[str | os.PathLike] | tuple[str, str],
                    ray_address: str | None = None, num_shards: int | None = None, batch_size: int = 8,
                    max_retries: int = 3, preprocessing: dict[str, Any] | None = None,
                    ray_timeout: float = DEFAULT_RAY_TIMEOUT) -> "MHPatchCore":
    """Fits ``model`` on Ray: the fit driver's schedule with the images split into ``num_shards`` path
    shards (default: the cluster's CPUs). ``images``: image files, or an MVTec ``(root, category)`` pair.
    ``preprocessing``: a ``mhpc.data.transforms`` dict (default: the whole image at the input size);
    ``ray_timeout``: seconds to wait for ``ray_address`` to answer."""
    from mhpc.data.transforms import check_preprocessing, make_preprocessing
    from mhpc.fit import driver

    import_ray()  # before any work: a missing extra is a one-line error, not a failure after the backbone loads
    paths = resolve_image_paths(images)
    model.begin_fit()
    pre = check_preprocessing(dict(preprocessing)) if preprocessing else make_preprocessing(model.input_shape, "none")
    if list(pre["input_size"]) != [int(s) for s in model.input_shape]:
        raise MHPCError(f"preprocessing input_size {pre['input_size']} does not match input_shape "
                        f"{list(model.input_shape)}")
    if pre.get("tile"):
        raise MHPCError("a distributed fit does not tile images; fit tiled models without --ray")
    model.preprocessing_ = pre
    if model.feature_reduction_.value == "PCA" and model.pca_solver != "covariance":
        raise MHPCError("a distributed fit merges covariance statistics; use pca_solver='covariance'")
    with ray_session(ray_address, ray_timeout) as ray:
        shards = shard_paths(paths, num_shards or max(1, int(ray.cluster_resources().get("CPU", 1))))
        driver.run(model, RayExecutor(ray, model, shards, pre, batch_size, max_retries))
    model.n_shards_ = len(shards)
    return model
