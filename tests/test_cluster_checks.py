"""Before a run connects: scheduler addresses, TLS, where it writes; and what its local cluster binds."""

from __future__ import annotations

import os
import re
from pathlib import Path

import dask
import psutil
import pytest
from distributed import LocalCluster
from distributed.comm.registry import backends

from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError, InputError
from dask_infer.io.writable import check_file_writable, check_run_targets, check_store_writable
from dask_infer.workflows.cluster import (
    LOCAL_HOST,
    address_schemes,
    check_scheduler,
    check_scheduler_address,
    client_security,
    make_client,
    scheduler_workers,
)
from tests.certificates import Certificates, make_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _listening(process: psutil.Process) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for c in process.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1].split("/")[0])


def test_local_cluster_listens_on_127_0_0_1_only() -> None:
    """Scheduler, dashboard, nanny and worker: every port the local cluster opens is on 127.0.0.1."""
    client, choice = make_client(device="cpu", n_workers=1, threads_per_worker=1)
    try:
        assert choice is not None and choice.kind == "LocalCluster"
        workers = scheduler_workers(client)
        addresses = [client.scheduler.address, *workers, *(w["nanny"] for w in workers.values())]
        assert all(a.startswith(f"tcp://{LOCAL_HOST}:") for a in addresses), addresses
        assert client.dashboard_link.startswith(f"http://{LOCAL_HOST}:")
        ports = {_port(a) for a in addresses} | {_port(client.dashboard_link.removeprefix("http://"))}
        here = [(ip, port) for ip, port in _listening(psutil.Process()) if port in ports]
        assert {port for _, port in here} == ports - {_port(a) for a in workers}
        pids = client.run(os.getpid).values()
        in_workers = [s for pid in pids for s in _listening(psutil.Process(pid))]
        assert in_workers and {ip for ip, _ in here + in_workers} == {LOCAL_HOST}, here + in_workers
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()


def test_address_schemes_are_distributed_s() -> None:
    schemes = address_schemes()
    assert {"tcp", "tls", "inproc"} <= set(schemes) and set(backends) <= set(schemes)


@pytest.mark.parametrize(
    "address", ["tcp://127.0.0.1:8786", "tls://10.0.0.5:8786", "127.0.0.1:8786", "tcp://[::1]:8786"]
)
def test_good_scheduler_addresses(address: str) -> None:
    check_scheduler_address(address)


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("foo://x:1", "scheduler 'foo://x:1' has unknown scheme 'foo'; give one of tcp://HOST:PORT"),
        ("tcp://", "scheduler 'tcp://' is not an address (missing port number"),
        ("tcp://host:port", "scheduler 'tcp://host:port' is not an address"),
        ("tls://:8786", "scheduler 'tls://:8786' names no host"),
        ("127.0.0.1", "scheduler '127.0.0.1' is not an address"),
    ],
)
def test_bad_scheduler_addresses_name_the_accepted_forms(address: str, match: str) -> None:
    with pytest.raises(DaskInferError, match=re.escape(match)) as caught:
        check_scheduler_address(address)
    shown = {f"{scheme}://HOST:PORT" for scheme in address_schemes()} - {"inproc://HOST:PORT"}
    assert all(form in str(caught.value) for form in shown) and "inproc" not in str(caught.value)


def test_no_security_without_tls() -> None:
    assert client_security(None) is None
    assert client_security("tcp://127.0.0.1:8786") is None


def test_tls_without_certificates_is_refused() -> None:
    with (
        dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}),
        pytest.raises(DaskInferError, match="needs TLS but no --tls-ca-file or --tls-cert is set; give"),
    ):
        client_security("tls://127.0.0.1:8786")


def test_tls_options_build_a_security_that_requires_encryption(certs: Certificates) -> None:
    security = client_security(
        "tls://127.0.0.1:8786", tls_ca_file=str(certs.ca), tls_cert=str(certs.cert), tls_key=str(certs.key)
    )
    assert security is not None and security.require_encryption
    assert (security.tls_ca_file, security.tls_client_cert, security.tls_client_key) == (
        str(certs.ca),
        str(certs.cert),
        str(certs.key),
    )
    assert security.get_connection_args("client")["ssl_context"] is not None


def test_tls_from_dask_config(certs: Certificates, tmp_path: Path) -> None:
    """Without the options, dask's distributed.comm.tls config applies; an option wins over it."""
    config = {
        "distributed.comm.tls.ca-file": str(certs.ca),
        "distributed.comm.tls.client.cert": str(certs.cert),
        "distributed.comm.tls.client.key": str(certs.key),
    }
    with dask.config.set(config):
        security = client_security("tls://127.0.0.1:8786")
        assert security is not None and security.tls_client_cert == str(certs.cert)
        with pytest.raises(DaskInferError, match=rf"--tls-ca-file '{tmp_path}/x.pem' does not exist"):
            client_security("tls://127.0.0.1:8786", tls_ca_file=str(tmp_path / "x.pem"))
    with (
        dask.config.set({**config, "distributed.comm.tls.client.key": str(tmp_path / "gone.key")}),
        pytest.raises(
            DaskInferError, match=r"dask config distributed.comm.tls.client.key '.*gone.key' does not"
        ),
    ):
        client_security("tls://127.0.0.1:8786")


def test_tls_files_that_do_not_match_are_refused(certs: Certificates, tmp_path: Path) -> None:
    other = make_certificates(tmp_path / "other")
    with pytest.raises(DaskInferError, match="the TLS files do not load"):
        client_security(
            "tls://127.0.0.1:8786",
            tls_ca_file=str(certs.ca),
            tls_cert=str(certs.cert),
            tls_key=str(other.key),
        )


def test_scheduler_file_address_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    path.write_text('{"address": "tls://127.0.0.1:8786"}')
    with (
        dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}),
        pytest.raises(DaskInferError, match="scheduler 'tls://127.0.0.1:8786' needs TLS"),
    ):
        check_scheduler(None, str(path))
    path.write_text('{"address": "tcp://127.0.0.1:8786"}')
    with pytest.raises(
        DaskInferError, match="TLS options given but the scheduler 'tcp://127.0.0.1:8786' is not"
    ):
        check_scheduler(None, str(path), tls_ca_file="ca.pem")
    path.write_text('{"id": 1}')
    with pytest.raises(DaskInferError, match="names no address"):
        check_scheduler(None, str(path))


def test_a_scheduler_without_workers_is_one_line() -> None:
    with (
        LocalCluster(n_workers=0, dashboard_address=":0", host="127.0.0.1") as cluster,
        pytest.raises(DaskInferError, match=r"has no workers after 1 s; start some with `dask worker tcp://"),
    ):
        make_client(scheduler=cluster.scheduler_address, worker_timeout=1)


def test_a_local_worker_that_cannot_start_is_one_line() -> None:
    """A worker preload that does not import: the nanny cannot start its worker, and the run says why."""
    with (
        dask.config.set({"distributed.worker.preload": ["no_such_module_for_dask_infer"]}),
        pytest.raises(
            DaskInferError,
            match=r"the local LocalCluster could not start its 1 worker\(s\) \(ModuleNotFoundError: "
            "No module named 'no_such_module_for_dask_infer'\\); fix what the workers' log names",
        ),
    ):
        make_client(device="cpu", n_workers=1, threads_per_worker=1)


# --- where a run writes -----------------------------------------------------------------------------


def test_writable_locations_pass_and_nothing_is_created(tmp_path: Path) -> None:
    check_store_writable("output", str(tmp_path / "new" / "deeper" / "o.zarr"))
    check_store_writable("output", f"file://{tmp_path}/o.zarr")
    check_store_writable("output", "memory://anything/o.zarr")
    check_file_writable("summary", str(tmp_path / "new" / "s.json"))
    (tmp_path / "old.json").write_text("{}")
    check_file_writable("summary", str(tmp_path / "old.json"))
    check_run_targets(str(tmp_path / "o.zarr"), summary=str(tmp_path / "s.json"), report=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


@pytest.mark.parametrize(
    ("kind", "path", "match"),
    [
        ("store", "{tmp}/file/o.zarr", "output '{tmp}/file/o.zarr' cannot be written: '{tmp}/file' is"),
        ("store", "file://{tmp}/file/a/b.zarr", "'{tmp}/file' is a file, not a folder; choose a path"),
        ("store", "/proc/self/o.zarr", "this user may not write in the folder '/proc/self'"),
        ("file", "{tmp}", "summary '{tmp}' cannot be written: it is a folder; give the path of a file"),
        ("file", "{tmp}/file/s.json", "'{tmp}/file' is a file, not a folder"),
    ],
)
def test_unwritable_locations_are_named(kind: str, path: str, match: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("keep me")
    check = check_store_writable if kind == "store" else check_file_writable
    with pytest.raises(InputError, match=re.escape(match.format(tmp=tmp_path))):
        check("output" if kind == "store" else "summary", path.format(tmp=tmp_path))
    assert (tmp_path / "file").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


# --- the options -------------------------------------------------------------------------------------


def test_tls_and_memory_options_in_the_config(tmp_path: Path) -> None:
    config = RunConfig(
        input="a",
        output="b",
        scheduler="tls://10.0.0.5:8786",
        tls_ca_file="ca.pem",
        tls_cert="c.pem",
        tls_key="c.key",
        memory_limit="4GB",
    )
    assert RunConfig.from_dict(config.to_dict()) == config
    (tmp_path / "run.yaml").write_text(config.to_yaml())
    assert RunConfig.from_yaml(tmp_path / "run.yaml") == config
    assert RunConfig(input="a", output="b", memory_limit=2**30).memory_limit == 2**30


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tls_cert": "c.pem"}, "tls_cert='c.pem' applies to a tls:// scheduler"),
        ({"scheduler": "tcp://h:1", "tls_ca_file": "ca.pem"}, "is not encrypted; use its tls:// address"),
        ({"scheduler": "tls://h:1", "tls_key": "k.pem"}, "tls_key='k.pem' given without tls_cert"),
        ({"scheduler": "tls://h:1", "tls_cert": 5}, "tls_cert=5 must be text"),
        ({"memory_limit": "0"}, "memory_limit='0' must be a size"),
        ({"memory_limit": True}, "memory_limit=True must be a size"),
        ({"memory_limit": -5}, "memory_limit=-5 must be a size"),
    ],
)
def test_bad_tls_and_memory_options(options: dict[str, object], match: str) -> None:
    with pytest.raises(DaskInferError, match=re.escape(match)):
        RunConfig(input="a", output="b", **options)  # type: ignore[arg-type]
