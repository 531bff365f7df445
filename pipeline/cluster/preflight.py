"""Pre-flight checks that make a multi-node run safe, run once Ray is up and before any stage starts.

On a cluster of more than one node, every node must see the same artifact store
and the same MLflow store, or a stage would commit files other nodes cannot read
and runs would land in a SQLite file on one machine. So `preflight` refuses a
local (SQLite or file) tracking URI, a loopback tracking URI when nodes sit on
other hosts, and an artifact root that a probe task on some node cannot read (a
local folder that is not a shared mount, or object storage without credentials
there). When a stage that reads `data.inputs` is about to run, every node also
resolves the inputs and reports the files and sizes it sees; a node that sees
other files than the driver is refused, naming the first differing file. (Under
`data.on_error: skip` such a node would skip the files it lacks as unreadable,
and the output would depend on where a task ran.)
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlparse

from pipeline.engine.store import ArtifactStore
from pipeline.errors import ClusterError
from pipeline.schema import Config

# --- preflight --------------------------------------------------------------

def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def is_local_tracking_uri(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # a bare path (or a Windows drive letter)


def _is_loopback(uri: str) -> bool:
    host = urlparse(uri).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def check_tracking(cfg: Config, tracking_uri: str | None, nodes: list[dict[str, Any]]) -> None:
    if not cfg.tracking.enabled or len(nodes) < 2 or tracking_uri is None:
        return
    if is_local_tracking_uri(tracking_uri):
        raise ClusterError(
            f"tracking: MLflow tracking URI {tracking_uri!r} is a local store, but the Ray cluster has {len(nodes)} nodes "
            "and training workers on other nodes cannot write to it; start an MLflow server that every node can reach "
            "and set MLFLOW_TRACKING_URI=http://<host>:5000 (or set tracking.enabled: false)")
    if _is_loopback(tracking_uri) and len({n["NodeManagerAddress"] for n in nodes}) > 1:
        raise ClusterError(
            f"tracking: MLflow tracking URI {tracking_uri!r} is a loopback address, but the Ray cluster spans "
            f"{len({n['NodeManagerAddress'] for n in nodes})} hosts; use an address of the MLflow server that the "
            "other nodes can reach (e.g. the head's private IP)")


def _read_probe(root: str, path: str) -> str:
    """Runs on one node: the probe file's content as that node sees it, or the error."""
    try:
        store = ArtifactStore(root)
        with store.fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except Exception as e:  # noqa: BLE001 - any failure means this node cannot use the store
        return f"error: {type(e).__name__}: {e}"


def _probe_result(ref: Any) -> str:
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    try:
        return ray.get(ref, timeout=120)
    except (GetTimeoutError, RayError) as e:  # a node dying or unschedulable is a node that cannot see the store
        return f"error: the probe task did not run there ({type(e).__name__})"


def check_store(store: ArtifactStore, nodes: list[dict[str, Any]]) -> None:
    """Write a probe file into the store and read it back from a task pinned to every node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    path = f"{store.base}/_probe/{token}"
    store.write_bytes(path, token.encode())
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(store.uri if not store.is_local else store.base, path) for n in nodes}
        blind = [(n, seen) for n in nodes if (seen := _probe_result(refs[n["NodeID"]])) != token]
    finally:
        store.delete(path)
    if blind:
        node, seen = blind[0]
        where = "a shared filesystem mounted at the same path on every node" if store.is_local else "credentials on every node"
        raise ClusterError(
            f"store.root {store.uri!r}: node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) cannot read what the "
            f"driver writes there ({seen if seen.startswith('error') else 'it sees other content'}); on a multi-node cluster "
            f"the artifact root must be shared storage: an s3:// or gs:// URI, or {where}"
            + (f" ({len(blind)} of {len(nodes)} nodes cannot)" if len(blind) > 1 else ""))


Files = list[tuple[str, int]]  # (uri, size) of each resolved input file, sorted


def _resolve_probe(specs: list[str]) -> Files | str:
    """Runs on one node: the input files and sizes that node sees, or the error."""
    from tokenization.inputs import resolve_inputs

    try:
        return [(f.uri, f.size) for f in resolve_inputs(specs)]
    except Exception as e:  # noqa: BLE001 - any failure means this node does not see the inputs the driver sees
        return f"error: {type(e).__name__}: {e}"


def first_difference(driver: Files, node: Files | str) -> str | None:
    """How a node's view of the inputs first differs from the driver's, in words; None when they agree."""
    if isinstance(node, str):
        return f"cannot resolve them ({node})"
    mine, theirs = dict(driver), dict(node)
    for uri in sorted(mine.keys() | theirs.keys()):
        if uri not in theirs:
            return f"does not see {uri} ({mine[uri]} bytes on the driver)"
        if uri not in mine:
            return f"sees {uri} ({theirs[uri]} bytes), which the driver does not"
        if mine[uri] != theirs[uri]:
            return f"sees {uri} with {theirs[uri]} bytes, the driver with {mine[uri]}"
    return None


def check_inputs(cfg: Config, nodes: list[dict[str, Any]]) -> None:
    """Resolve `data.inputs` (and `index.inputs`, with an index section) in a task pinned to every node and refuse
    a node that sees other files than the driver."""
    if len(nodes) < 2:
        return
    for i, (name, specs) in enumerate(cfg.data.input_groups().items()):
        _check_specs(f"data.sources.{i}.inputs" if name else "data.inputs", specs, nodes)
    if cfg.index is not None:
        _check_specs("index.inputs", list(cfg.index.inputs), nodes)


def _check_specs(key: str, specs: list[str], nodes: list[dict[str, Any]]) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tokenization.inputs import resolve_inputs

    driver = [(f.uri, f.size) for f in resolve_inputs(specs)]  # an InputError here is the driver's own, as in plan
    probe = ray.remote(num_cpus=0, max_retries=0)(_resolve_probe)
    refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(specs) for n in nodes}
    differ = [(n, d) for n in nodes if (d := first_difference(driver, _probe_result(refs[n["NodeID"]]))) is not None]
    if differ:
        node, how = differ[0]
        raise ClusterError(
            f"{key}: node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) {how}; on a multi-node cluster "
            "every node must see the same input files (a shared filesystem mounted at the same path on every node, or "
            "object storage), or the output would depend on where a task ran"
            + (f" ({len(differ)} of {len(nodes)} nodes differ)" if len(differ) > 1 else ""))


def preflight(cfg: Config, store: ArtifactStore, tracking_uri: str | None, *, inputs: bool = False) -> None:
    """Refuse, before any stage starts, a cluster whose nodes would not share the store and the tracking, and
    (`inputs`: a stage that reads `data.inputs` will run) whose nodes do not all see the same input files."""
    nodes = alive_nodes()
    check_tracking(cfg, tracking_uri, nodes)
    check_store(store, nodes)
    if inputs:
        check_inputs(cfg, nodes)
