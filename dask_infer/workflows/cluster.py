"""Make or connect a Dask cluster: a GPU machine, a CPU machine, or an address (TLS or not).

Addresses, certificates and scheduler files are checked before connecting; a local
cluster listens on 127.0.0.1 only; workers lost while a run loads or runs its model
end the run with one line saying why.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.security import Security
from distributed.system import MEMORY_LIMIT

from dask_infer.errors import DaskInferError, reason
from dask_infer.options import DEVICES, check_choice
from dask_infer.workflows.cores import usable_cores
from dask_infer.workflows.gpu_sharing import GPUSharingCluster, visible_devices

__all__ = [
    "LOCAL_HOST",
    "ClusterChoice",
    "address_schemes",
    "check_scheduler",
    "check_scheduler_address",
    "check_scheduler_file",
    "client_security",
    "choose_local_cluster",
    "cuda_device_count",
    "device_memory",
    "lost_workers",
    "make_client",
    "scheduler_workers",
    "wait_for_a_worker",
    "worker_deaths",
]

LOCAL_HOST = "127.0.0.1"
"""The only interface a local cluster's scheduler, workers, nannies and dashboard listen on."""

CONNECT_TIMEOUT = "10s"
"""How long a client tries to reach a scheduler."""

WORKER_TIMEOUT = 60.0
"""Seconds a scheduler is given to have a worker before a run gives up."""

_ENCRYPTED = ("tls", "wss")
"""Address schemes whose connections are TLS."""


def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without a GPU or without CUDA torch)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def device_memory(device: str = "auto") -> int | None:
    """Total bytes of this process's CUDA device, ``None`` without one (run on each worker)."""
    if device == "cpu":
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    except Exception:
        return None


@dataclass(frozen=True)
class ClusterChoice:
    """The local cluster a run starts: kind, workers, threads, and torch threads per worker."""

    kind: str
    n_workers: int
    threads_per_worker: int
    torch_threads: int | None
    shared_gpus: int = 0
    """GPUs a ``LocalCluster`` of more workers than GPUs spreads them over; 0 for the others."""

    def describe(self) -> str:
        """One line for the run's log."""
        sharing = f" sharing {self.shared_gpus} GPU(s)" if self.shared_gpus else ""
        return f"{self.kind}: {self.n_workers} worker(s){sharing} x {self.threads_per_worker} thread(s)" + (
            f", torch threads {self.torch_threads}" if self.torch_threads else ""
        )


def choose_local_cluster(
    *, device: str = "auto", n_workers: int | None = None, threads_per_worker: int | None = None
) -> ClusterChoice:
    """Pick the local cluster from what this machine has.

    One ``LocalCUDACluster`` worker per GPU; more workers than GPUs share them, several
    worker processes per GPU (:mod:`dask_infer.workflows.gpu_sharing`). On a CPU-only
    machine one worker process whose single compute thread gives torch every core, with
    spare threads for reading and writing chunks while the model runs.
    """
    gpus = cuda_device_count() if device in ("auto", "cuda") else 0
    check_choice("device", device, DEVICES)
    if device == "cuda" and gpus == 0:
        raise DaskInferError("device='cuda' but no CUDA device is visible; use --device cpu")
    cores = usable_cores()
    if gpus:
        # decoding feeds the GPU: give each worker its share of cores for I/O threads
        workers = n_workers or gpus
        io_threads = threads_per_worker or max(4, min(16, cores // max(workers, gpus)))
        if workers > gpus:
            return ClusterChoice("LocalCluster", workers, io_threads, None, shared_gpus=gpus)
        return ClusterChoice("LocalCUDACluster", workers, io_threads, None)
    workers = n_workers or 1
    torch_threads = max(1, cores // workers)
    return ClusterChoice("LocalCluster", workers, threads_per_worker or 3, torch_threads)


def worker_environ() -> dict[str, object]:
    """Distributed's worker environment without its fixed ``MALLOC_TRIM_THRESHOLD_``.

    A fixed trim threshold also fixes glibc's mmap threshold, so every large activation
    buffer becomes a fresh mmap with page faults on first touch; torch's CPU allocator
    relies on the dynamic threshold to reuse them.
    """
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


def check_scheduler_file(path: str) -> None:
    """Raise unless ``path`` is a file a scheduler could have written (checked before any work)."""
    if not Path(path).is_file():
        raise DaskInferError(
            f"scheduler file {path!r} does not exist; give the file that "
            "`dask scheduler --scheduler-file` wrote"
        )


def _address_in(path: str) -> str:
    """The scheduler address that ``path`` (a scheduler file) names."""
    check_scheduler_file(path)
    try:
        address = json.loads(Path(path).read_text()).get("address")
    except (OSError, ValueError, AttributeError) as exc:
        raise DaskInferError(
            f"scheduler file {path!r} is not a scheduler's JSON ({reason(exc)}); give the file that "
            "`dask scheduler --scheduler-file` wrote"
        ) from None
    if not isinstance(address, str):
        raise DaskInferError(
            f"scheduler file {path!r} names no address; give the file that "
            "`dask scheduler --scheduler-file` wrote"
        )
    return address


def address_schemes() -> tuple[str, ...]:
    """The address schemes distributed registers (its own and those of installed plugins)."""
    from distributed.comm.registry import backends  # importing distributed.comm registers its own

    plugins = {ep.name for ep in entry_points(group="distributed.comm.backends")}
    return tuple(sorted(set(backends) | plugins))


def _scheme(address: str) -> str:
    scheme, sep, _ = address.partition("://")
    return scheme if sep else str(dask.config.get("distributed.comm.default-scheme"))


def check_scheduler_address(address: str) -> None:
    """Raise, naming the accepted forms, unless ``address`` is a scheduler address distributed reads.

    Raises
    ------
    DaskInferError
        For an unknown scheme (``foo://``) or an address without a host or a port.
    """
    from distributed.comm.addressing import get_address_host_port

    schemes = address_schemes()
    # inproc:// reaches a scheduler in this same process only: valid, but not one to suggest
    forms = ", ".join(f"{s}://HOST:PORT" for s in schemes if s != "inproc")
    scheme = _scheme(address)
    if scheme not in schemes:
        raise DaskInferError(f"scheduler {address!r} has unknown scheme {scheme!r}; give one of {forms}")
    if scheme == "inproc":
        return
    try:
        host, _ = get_address_host_port(address if "://" in address else f"{scheme}://{address}")
    except Exception as exc:
        raise DaskInferError(
            f"scheduler {address!r} is not an address ({reason(exc)}); give {forms}"
        ) from None
    if not host:
        raise DaskInferError(f"scheduler {address!r} names no host; give {forms}")


_TLS_FLAGS = {
    "tls_ca_file": ("--tls-ca-file", "distributed.comm.tls.ca-file"),
    "tls_client_cert": ("--tls-cert", "distributed.comm.tls.client.cert"),
    "tls_client_key": ("--tls-key", "distributed.comm.tls.client.key"),
}
"""Security's client fields: the dask-infer option and the dask config key that set each."""

_TLS_HELP = (
    "give --tls-ca-file, --tls-cert and --tls-key (PEM files), or set distributed.comm.tls.ca-file, "
    ".client.cert and .client.key in dask's config"
)


def client_security(
    address: str | None,
    *,
    tls_ca_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> Security | None:
    """The TLS settings a client of the scheduler at ``address`` connects with.

    Parameters
    ----------
    address
        The scheduler's address; ``None`` for a local cluster.
    tls_ca_file, tls_cert, tls_key
        PEM files; those not given come from dask's ``distributed.comm.tls`` config.

    Returns
    -------
    Security or None
        ``None`` for an unencrypted scheduler given no TLS option; else settings that
        require encryption, their files loaded once here.

    Raises
    ------
    DaskInferError
        A ``tls://`` address without a CA or a certificate, a file that does not exist,
        or files that do not load as a certificate, its key and a CA.
    """
    given = {
        name: value
        for name, value in zip(_TLS_FLAGS, (tls_ca_file, tls_cert, tls_key), strict=True)
        if value is not None
    }
    if not given and (address is None or _scheme(address) not in _ENCRYPTED):
        return None
    security = Security(require_encryption=True, **given)
    missing = [_TLS_FLAGS[n][0] for n in ("tls_ca_file", "tls_client_cert") if not getattr(security, n)]
    if missing:
        raise DaskInferError(
            f"scheduler {address!r} needs TLS but no {' or '.join(missing)} is set; {_TLS_HELP}"
        )
    for name, (flag, key) in _TLS_FLAGS.items():
        value = getattr(security, name)
        # dask's config may hold the PEM text itself rather than a file name
        if value and "\n" not in value and not Path(value).is_file():
            source = flag if name in given else f"dask config {key}"
            what = "is not a file" if Path(value).exists() else "does not exist"
            raise DaskInferError(f"{source} {value!r} {what}; {_TLS_HELP}")
    try:
        security.get_connection_args("client")
    except (ssl.SSLError, OSError) as exc:
        raise DaskInferError(
            f"the TLS files do not load ({reason(exc)}); --tls-cert and --tls-key must be a PEM "
            "certificate and its private key, and --tls-ca-file the CA that signed the cluster's"
        ) from None
    return security


def check_scheduler(
    scheduler: str | None,
    scheduler_file: str | None,
    *,
    tls_ca_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> Security | None:
    """Check a scheduler address or file and the TLS settings, before connecting.

    Returns
    -------
    Security or None
        What the client connects with (see :func:`client_security`).
    """
    address = _address_in(scheduler_file) if scheduler_file is not None else scheduler
    if address is not None:
        check_scheduler_address(address)
        tls = any(value is not None for value in (tls_ca_file, tls_cert, tls_key))
        if tls and _scheme(address) not in _ENCRYPTED:
            raise DaskInferError(
                f"TLS options given but the scheduler {address!r} is not encrypted; "
                "use its tls:// address, or leave the TLS options out"
            )
    return client_security(address, tls_ca_file=tls_ca_file, tls_cert=tls_cert, tls_key=tls_key)


def _connect(scheduler: str | None, scheduler_file: str | None, security: Security | None) -> Client:
    """A client of the scheduler at ``scheduler`` or named in ``scheduler_file``."""
    where = f"named in {scheduler_file!r}" if scheduler_file is not None else f"at {scheduler!r}"
    try:
        if scheduler_file is not None:
            return Client(scheduler_file=scheduler_file, timeout=CONNECT_TIMEOUT, security=security)
        return Client(scheduler, timeout=CONNECT_TIMEOUT, security=security)
    except (OSError, TimeoutError, ValueError, KeyError) as exc:
        hint = "; check --tls-ca-file, --tls-cert and --tls-key" if security is not None else ""
        raise DaskInferError(f"cannot reach the Dask scheduler {where}: {reason(exc)}{hint}") from None


def wait_for_a_worker(client: Client, timeout: float) -> None:
    """Return once the scheduler has a worker; raise in one line after ``timeout`` seconds without."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        address = client.scheduler.address if client.scheduler is not None else "?"
        raise DaskInferError(
            f"the Dask scheduler at {address} has no workers after {timeout:g} s; "
            f"start some with `dask worker {address}` (and the same TLS options), then run again"
        ) from None


def make_client(
    *,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    device: str = "auto",
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    tls_ca_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    worker_timeout: float = WORKER_TIMEOUT,
) -> tuple[Client, ClusterChoice | None]:
    """Connect to ``scheduler`` or ``scheduler_file``, or start the local cluster this machine suits.

    Returns the client and the local cluster choice (``None`` when connected to an
    existing scheduler). Local services listen on 127.0.0.1 only. A scheduler is
    waited on for ``worker_timeout`` seconds to have a worker.
    """
    if scheduler_file is not None or scheduler is not None:
        security = check_scheduler(
            scheduler, scheduler_file, tls_ca_file=tls_ca_file, tls_cert=tls_cert, tls_key=tls_key
        )
        client = _connect(scheduler, scheduler_file, security)
        try:
            wait_for_a_worker(client, worker_timeout)
        except BaseException:
            client.close()
            raise
        return client, None
    choice = choose_local_cluster(device=device, n_workers=n_workers, threads_per_worker=threads_per_worker)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}):
        cluster = _start_cluster(choice, memory_limit)
    return Client(cluster), choice


def _start_cluster(choice: ClusterChoice, memory_limit: str | int | None = None) -> LocalCluster:
    """Start ``choice``'s local cluster, every service on 127.0.0.1; one line if its workers cannot start."""
    limit: dict[str, str | int] = {} if memory_limit is None else {"memory_limit": memory_limit}
    try:
        if choice.kind == "LocalCUDACluster":
            from dask_cuda import LocalCUDACluster

            return LocalCUDACluster(
                n_workers=choice.n_workers,
                threads_per_worker=choice.threads_per_worker,
                host=LOCAL_HOST,
                dashboard_address=f"{LOCAL_HOST}:8787",
                **limit,
            )
        if choice.shared_gpus:
            return GPUSharingCluster(
                n_workers=choice.n_workers,
                devices=visible_devices(choice.shared_gpus),
                threads_per_worker=choice.threads_per_worker,
                host=LOCAL_HOST,
                dashboard_address=f"{LOCAL_HOST}:8787",
                memory_limit=memory_limit or MEMORY_LIMIT // choice.n_workers,
            )
        return LocalCluster(
            n_workers=choice.n_workers,
            threads_per_worker=choice.threads_per_worker,
            processes=True,
            host=LOCAL_HOST,
            dashboard_address=f"{LOCAL_HOST}:8787",
            **limit,
        )
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise DaskInferError(
            f"the local {choice.kind} could not start its {choice.n_workers} worker(s) "
            f"({_root_reason(exc)}); fix what the workers' log names (their Python environment, "
            "dask's worker config, --memory-limit), then run again"
        ) from None


def _root_reason(exc: BaseException) -> str:
    """The first line of the innermost error ``exc`` was raised from."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {reason(exc)}"


def _memory_restarts(client: Client) -> list[dict[str, Any]]:
    """The nannies' reports of workers they restarted for exceeding their memory limit."""
    try:
        events = client.get_events("worker-restart-memory")
    except Exception:
        return []
    return [msg for _, msg in events if isinstance(msg, dict)]


def scheduler_workers(client: Client) -> dict[str, dict[str, Any]]:
    """Every worker's record as the scheduler has it now (address, status, memory, resources).

    Asked of the scheduler directly: ``client.scheduler_info()`` returns a copy the
    client's periodic refresh may replace, between the call's fetch and its return, by one
    that lists no workers.
    """
    if client.scheduler is None:
        raise DaskInferError("the client is not connected to a Dask scheduler")
    identity = client.sync(client.scheduler.identity, n_workers=-1)
    return dict(identity.get("workers") or {})


def _limit_of(client: Client, memory_limit: str | int | None) -> int | None:
    """The workers' memory limit in bytes: as configured, else the largest the scheduler reports."""
    from dask.utils import parse_bytes

    if memory_limit is not None:
        return parse_bytes(memory_limit)
    try:
        info = scheduler_workers(client)
    except Exception:
        return None
    return max((int(r.get("memory_limit") or 0) for r in info.values()), default=0) or None


def lost_workers(
    client: Client, exc: BaseException, *, model: str, memory_limit: str | int | None = None
) -> DaskInferError:
    """One line for a run whose workers died: why, as the nannies reported it, and what to do.

    Parameters
    ----------
    client
        The run's client, whose scheduler holds the nannies' reports.
    exc
        What the run raised when it lost them.
    model
        The model being loaded or run, for the message.
    memory_limit
        The local workers' configured memory limit, if any.
    """
    from dask.utils import format_bytes

    restarts = _memory_restarts(client)
    if not restarts:
        return DaskInferError(
            f"the run lost its workers ({reason(exc)}): a worker process died or was killed; see the "
            "workers' logs for why, fix it, then run again (with --resume to keep chunks already written)"
        )
    last = restarts[-1]
    limit = _limit_of(client, memory_limit)
    fraction = dask.config.get("distributed.worker.memory.terminate", default=0.95)
    over = (
        f"over {100 * fraction:.0f}% of its {format_bytes(limit)} memory limit" if limit else "over its limit"
    )
    return DaskInferError(
        f"worker {last.get('worker')} was restarted by its nanny {len(restarts)} time(s) for using "
        f"{format_bytes(int(last.get('rss') or 0))}, {over}, while loading or running {model}; give "
        "each worker more memory (--memory-limit for a local cluster, `dask worker --memory-limit` "
        "for others) or fewer threads, then run again"
    )


@contextlib.contextmanager
def worker_deaths(client: Client, *, model: str, memory_limit: str | int | None = None) -> Iterator[None]:
    """Turn a run's lost workers (a dead connection, a task whose workers all died) into one line."""
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    try:
        yield
    except (CommClosedError, KilledWorker) as exc:
        raise lost_workers(client, exc, model=model, memory_limit=memory_limit) from None
