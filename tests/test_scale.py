"""Scale (issue 7, item 3): many volumes at once, many cycles, many layers.

Everything is real: `csi-oci serve` as a subprocess, Debian's docker-registry
on loopback, bind mounts (needs root). Nothing here asserts a duration: the
times are printed (run with `-s`) for the report, the assertions are about
correctness and leaks, which must hold however slow the machine is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from csi_oci.csi.server import MAX_WORKERS
from csi_oci.publish.locks import LOCK_STRIPES
from csi_oci.publish.volumes import VolumeManager
from csi_oci.pull.puller import Puller
from csi_oci.spec.attributes import parse_volume_attributes
from csi_oci.storage.store import Store
from tests.support.driver import Driver, settled, wait_for
from tests.support.images import Dir, Entry, File, Image, Layer, Opaque, Whiteout, push_image
from tests.support.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")

CONCURRENT_VOLUMES = 50
CYCLES = 1000
WARM_UP_CYCLES = 50
LAYER_COUNT = 200

# -- helpers -------------------------------------------------------------------------

# Each test starts a fresh driver (own state dir; tests/conftest.py make_driver) with
# /metrics on a free port: fresh, so "the store holds one tree" and the process's
# baseline resources belong to that test alone.


def report(what: str, **numbers: object) -> None:
    """Measured numbers go to stdout (pytest -s), never into assertions."""
    print(f"\n[scale] {what}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def kubelet_target(root: Path, pod: str, name: str = "vol") -> Path:
    """A kubelet-shaped target whose parent exists (kubelet creates the parent)."""
    parent = root / "pods" / pod / "volumes" / "kubernetes.io~csi" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def file_digests(root: Path) -> dict[str, str]:
    """path -> sha256 of each regular file, 'dir' for directories (no symlinks here)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, from the test's own mount table."""
    prefix = os.path.normpath(str(root))
    with open("/proc/self/mountinfo") as f:
        points = [line.split(" ")[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def pulls_succeeded(port: int) -> float:
    """csi_oci_pulls_total{outcome="succeeded"} from the driver's real /metrics."""
    resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    resp.raise_for_status()
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == "csi_oci_pulls_total" and sample.labels == {"outcome": "succeeded"}:
                return sample.value
    return 0.0


def volume_records(driver: Driver) -> list[Path]:
    return sorted((driver.state_dir / "volumes").glob("*.json"))


def store_trees(driver: Driver) -> list[str]:
    images = driver.state_dir / "images" / "sha256"
    return sorted(p.name for p in images.iterdir()) if images.is_dir() else []


def run_concurrently(call: Callable[[int], object], count: int) -> dict[int, BaseException]:
    """Run call(0..count-1) in `count` threads released together; errors by index."""
    barrier = threading.Barrier(count)
    errors: dict[int, BaseException] = {}

    def one(i: int) -> None:
        barrier.wait()
        try:
            call(i)
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# -- 50 volumes of one image at once --------------------------------------------------


@pytest.mark.slow
def test_fifty_concurrent_publishes_of_an_uncached_image_pull_once(make_driver, registry, tmp_path):
    driver = make_driver(metrics=True)
    payload = {f"models/shard-{i}.bin": os.urandom(400_000) for i in range(3)}
    layers = [
        Layer([Dir("models"), File("models/shard-0.bin", payload["models/shard-0.bin"])]),
        Layer([File("models/shard-1.bin", payload["models/shard-1.bin"])], compression="zstd"),
        Layer([File("models/shard-2.bin", payload["models/shard-2.bin"])], compression="none"),
    ]
    image = Image(layers)
    push_image(registry, image, "scale/fifty:v1", tmp_path)
    ref = f"{registry.host}/scale/fifty:v1"
    expected = {"models": "dir"} | {p: hashlib.sha256(d).hexdigest() for p, d in payload.items()}
    pulls_before = pulls_succeeded(driver.metrics_port)

    root = tmp_path / "kubelet"
    targets = [kubelet_target(root, f"pod-{i}") for i in range(CONCURRENT_VOLUMES)]
    started = time.monotonic()
    errors = run_concurrently(
        lambda i: driver.publish(targets[i], {"image": ref}, volume_id=f"fifty-{i}"),
        CONCURRENT_VOLUMES,
    )
    publish_seconds = time.monotonic() - started
    assert errors == {}
    for target in targets:
        assert file_digests(target) == expected, target

    # One download of each blob (layers and config), whatever the concurrency.
    wanted = {layer.digest for layer in layers} | {image.config_digest}
    settled(lambda: sum(registry.blob_gets("scale/fifty").values()), len(wanted))
    assert registry.blob_gets("scale/fifty") == Counter(dict.fromkeys(wanted, 1))
    assert pulls_succeeded(driver.metrics_port) - pulls_before == 1
    assert store_trees(driver) == [image.manifest_digest.removeprefix("sha256:")]
    assert len(mounts_under(root)) == CONCURRENT_VOLUMES
    assert len(volume_records(driver)) == CONCURRENT_VOLUMES

    started = time.monotonic()
    errors = run_concurrently(
        lambda i: driver.unpublish(targets[i], volume_id=f"fifty-{i}"), CONCURRENT_VOLUMES
    )
    unpublish_seconds = time.monotonic() - started
    assert errors == {}
    assert [t for t in targets if t.exists()] == []
    assert mounts_under(root) == []
    assert volume_records(driver) == []
    report(
        "50 concurrent volumes",
        publish_s=f"{publish_seconds:.2f}",
        unpublish_s=f"{unpublish_seconds:.2f}",
        blob_gets=sum(registry.blob_gets("scale/fifty").values()),
        blobs=len(wanted),
    )


# -- 1,000 publish/unpublish cycles -----------------------------------------------------


def process_usage(pid: int) -> dict[str, int]:
    """Open fds, threads and resident KiB of a process, from /proc."""
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "rss_kib": rss_kib,
    }


def cycle(driver: Driver, root: Path, ref: str, n: int) -> None:
    """One pod's life as kubelet drives it: its own target path and volume id."""
    target = kubelet_target(root, f"pod-{n:05d}")
    driver.publish(target, {"image": ref}, volume_id=f"cycle-{n}")
    assert (target / "model.json").read_bytes() == b'{"layers": 2}'
    driver.unpublish(target, volume_id=f"cycle-{n}")
    assert not target.exists()
    target.parent.rmdir()  # kubelet removes the volume dir; only the csi driver's work is left


def fill_rpc_pool(driver: Driver, root: Path, ref: str) -> None:
    """Make the driver start every gRPC worker thread it will ever have.

    Python's ThreadPoolExecutor adds a worker whenever a request arrives
    before the previous worker has marked itself idle: a race that, over
    many sequential calls, grows the pool now and then up to MAX_WORKERS.
    That growth is bounded, not a leak, but it would make a thread count
    taken after a warm-up meaningless. So: hold the flock that serializes
    one target stripe (the driver's own cross-process lock, taken from
    outside as the lazy-server would), send more publishes to that stripe
    than the pool has workers, and wait until MAX_WORKERS of them are
    blocked on it, each holding one worker. Then let them all finish.
    """
    count = MAX_WORKERS + 4
    targets = targets_on_one_stripe(root, count)
    lock_file = driver.state_dir / "volumes" / "locks" / f"{stripe_of(targets[0]):02x}"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        threads = [
            threading.Thread(
                target=driver.publish, args=(t, {"image": ref}), kwargs={"volume_id": f"fill-{i}"}
            )
            for i, t in enumerate(targets)
        ]
        for t in threads:
            t.start()
        blocked = wait_for(lambda: fds_on(driver.proc.pid, lock_file) == MAX_WORKERS, 60)
        assert blocked, f"{fds_on(driver.proc.pid, lock_file)} publishes blocked"
    finally:
        os.close(fd)  # releases the flock
    for t in threads:
        t.join()
    for i, target in enumerate(targets):
        driver.unpublish(target, volume_id=f"fill-{i}")
        assert not target.exists()


def stripe_of(target: Path) -> int:
    """The driver's lock stripe of a target (volumes.VolumeManager._stripe)."""
    return hashlib.sha256(os.path.normpath(str(target)).encode()).digest()[0] % LOCK_STRIPES


def targets_on_one_stripe(root: Path, count: int) -> list[Path]:
    by_stripe: dict[int, list[Path]] = {}
    n = 0
    while True:
        parent = root / "fill" / f"pod-{n}" / "volumes" / "kubernetes.io~csi" / "vol"
        group = by_stripe.setdefault(stripe_of(parent / "mount"), [])
        group.append(parent / "mount")
        if len(group) == count:
            for target in group:
                target.parent.mkdir(parents=True, exist_ok=True)
            return group
        n += 1


def fds_on(pid: int, path: Path) -> int:
    """How many of the process's open fds are `path` (publishes waiting on a flock)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
    return count


def settled_at_most(pid: int, before: dict[str, int]) -> dict[str, int]:
    """Usage once fds and threads are back to `before` (or after 60 s, for the assertion).

    Threads come and go on their own: gRPC core starts an extra timer thread
    under load and retires it when idle, and the store's flush thread exits
    after 60 s without work. A leak never goes back; a transient does.
    """
    wait_for(
        lambda: all(process_usage(pid)[k] <= before[k] for k in ("fds", "threads")), timeout=60
    )
    return process_usage(pid)


@pytest.mark.slow
def test_a_thousand_cycles_leak_no_mounts_fds_threads_or_memory(make_driver, registry, tmp_path):
    driver = make_driver(metrics=True)
    image = Image([Layer([File("model.json", b'{"layers": 2}'), File("w.bin", os.urandom(4096))])])
    push_image(registry, image, "scale/cycles:v1", tmp_path)
    ref = f"{registry.host}/scale/cycles:v1"
    root = tmp_path / "kubelet"
    pid = driver.proc.pid

    for n in range(WARM_UP_CYCLES):  # the first one pulls; the rest fill caches
        cycle(driver, root, ref, n)
    fill_rpc_pool(driver, root, ref)
    before = process_usage(pid)
    assert mounts_under(root) == []

    started = time.monotonic()
    for n in range(WARM_UP_CYCLES, WARM_UP_CYCLES + CYCLES):
        cycle(driver, root, ref, n)
    seconds = time.monotonic() - started
    right_after = process_usage(pid)
    after = settled_at_most(pid, before)

    assert mounts_under(root) == []
    assert volume_records(driver) == []
    assert after["fds"] <= before["fds"], (before, after)
    assert after["threads"] <= before["threads"], (before, after)
    assert right_after["rss_kib"] < before["rss_kib"] * 1.10, (before, right_after)
    assert pulls_succeeded(driver.metrics_port) == 1
    report(
        f"{CYCLES} publish/unpublish cycles",
        seconds=f"{seconds:.1f}",
        per_cycle_ms=f"{1000 * seconds / CYCLES:.1f}",
        before=before,
        right_after=right_after,
        settled=after,
        rss_growth=f"{100 * (right_after['rss_kib'] / before['rss_kib'] - 1):.2f}%",
    )


def test_cycles_leave_no_per_target_lock_behind(registry, tmp_path):
    """Regression: the per-target lock table grew by one entry per target ever seen.

    kubelet gives every pod a new target path, so a node's driver kept a
    lock (and the path) for every pod it ever served. Too small to see in
    RSS over 1,000 cycles, hence checked in process, on the real store,
    registry and mounts.
    """
    push_image(registry, Image([Layer([File("m", b"m")])]), "scale/locks:v1", tmp_path)
    store = Store(tmp_path / "state")
    store.ensure_layout()
    volumes = VolumeManager(store, Puller(store))
    spec = parse_volume_attributes({"image": f"{registry.host}/scale/locks:v1"})
    root = tmp_path / "kubelet"
    for n in range(20):
        target = str(kubelet_target(root, f"pod-{n}"))
        volumes.publish(f"vol-{n}", target, spec, None)
        volumes.unpublish(f"vol-{n}", target)
    assert mounts_under(root) == []
    assert volumes.locks._locks == {}  # the leak itself is in this private table


# -- a 200-layer image ------------------------------------------------------------------


def layer_entries(i: int) -> list[Entry]:
    """Layer i of the deep image: its own file, overwrites, and some deletions."""
    entries: list[Entry] = [
        Dir("own"),
        File(f"own/l{i:03d}", f"layer {i} own file\n".encode()),
        Dir("shared"),
        File("shared/last", f"written by layer {i}\n".encode()),  # every layer overwrites
        File(f"shared/slot-{i % 7}", f"slot {i % 7} from layer {i}\n".encode()),
    ]
    if i == 40:
        entries += [
            Dir("doomed"),
            File("doomed/a", b"a"),
            Dir("doomed/sub"),
            File("doomed/sub/b", b"b"),
        ]
    if i == 60:
        entries += [Dir("opaque"), File("opaque/old", b"hidden by layer 150")]
    if i == 100:
        entries += [Whiteout("own/l050"), Whiteout("doomed")]  # a file and a whole directory
    if i == 150:
        entries += [Dir("opaque"), Opaque("opaque"), File("opaque/new", b"after the opaque")]
    if i == 180:
        entries += [Whiteout("shared/slot-3")]
    return entries


def overlay(layers: list[list[Entry]]) -> dict[str, str]:
    """The final tree as the OCI layer spec defines it, computed on a plain dict.

    Independent of the driver's applier: paths map to 'dir' or file bytes'
    sha256; a whiteout deletes a path and everything below it; an opaque
    marker deletes what lower layers put below its directory.
    """
    tree: dict[str, str] = {}
    for entries in layers:
        for entry in entries:
            if isinstance(entry, Whiteout) or isinstance(entry, Opaque):
                path = entry.path if isinstance(entry, Whiteout) else entry.dir
                keep_self = isinstance(entry, Opaque)
                for p in [p for p in tree if p.startswith(path + "/") or p == path]:
                    if not (keep_self and p == path):
                        del tree[p]
            elif isinstance(entry, Dir):
                tree[entry.path] = "dir"
            elif isinstance(entry, File):
                tree[entry.path] = hashlib.sha256(entry.data).hexdigest()
    return tree


def push_over_http(registry: Registry, image: Image, repo: str, tag: str) -> None:
    """Upload an image's blobs and manifest with plain HTTP calls (anonymous registry).

    skopeo takes ~80 ms a blob here (16 s for 200 layers); two requests
    on one kept-alive session take a few ms. The bytes are the same.
    """
    with requests.Session() as http:
        blobs = [(layer.digest, layer.blob) for layer in image.layers]
        for digest, data in [*blobs, (image.config_digest, image.config_bytes)]:
            start = http.post(f"{registry.url}/v2/{repo}/blobs/uploads/", timeout=30)
            assert start.status_code == 202, start.text
            location = urljoin(registry.url, start.headers["Location"])
            sep = "&" if "?" in location else "?"
            put = http.put(f"{location}{sep}digest={digest}", data=data, timeout=30)
            assert put.status_code == 201, put.text
        resp = http.put(
            f"{registry.url}/v2/{repo}/manifests/{tag}",
            data=image.manifest_bytes,
            headers={"Content-Type": image.media_type},
            timeout=30,
        )
        assert resp.status_code == 201, resp.text


@pytest.mark.slow
def test_a_200_layer_image_publishes_its_exact_final_tree(make_driver, registry, tmp_path):
    driver = make_driver(metrics=True)
    compressions = ("gzip", "zstd", "none")
    contents = [layer_entries(i) for i in range(LAYER_COUNT)]
    layers = [Layer(e, compression=compressions[i % 3]) for i, e in enumerate(contents)]
    image = Image(layers)
    pushed = time.monotonic()
    push_over_http(registry, image, "scale/deep", "v1")
    push_seconds = time.monotonic() - pushed
    expected = overlay(contents)
    assert "own/l050" not in expected and "doomed" not in expected  # the test's own sanity
    assert expected["shared/last"] == hashlib.sha256(b"written by layer 199\n").hexdigest()

    target = kubelet_target(tmp_path / "kubelet", "pod-deep")
    started = time.monotonic()
    driver.publish(target, {"image": f"{registry.host}/scale/deep:v1"}, volume_id="deep")
    seconds = time.monotonic() - started
    try:
        assert file_digests(target) == expected
        wanted = {layer.digest for layer in layers} | {image.config_digest}
        settled(lambda: sum(registry.blob_gets("scale/deep").values()), len(wanted))
        assert registry.blob_gets("scale/deep") == Counter(dict.fromkeys(wanted, 1))
    finally:
        driver.unpublish(target, volume_id="deep")
    assert not target.exists()
    report(
        f"{LAYER_COUNT}-layer image",
        push_s=f"{push_seconds:.2f}",
        publish_s=f"{seconds:.2f}",
        files=sum(1 for v in expected.values() if v != "dir"),
        blob_bytes=sum(layer.size for layer in layers),
    )


@pytest.mark.slow
def test_a_publish_that_missed_the_tree_by_a_moment_joins_the_finished_pull(registry, tmp_path):
    """Regression: a second download when a pull finished under a publish's feet.

    `ensure` looks for the tree, then asks for the pull job. A publish that
    looked just before the running pull committed, and asked just after it
    finished, found a finished job, started a new one and downloaded the
    whole image again: 50 publishes at once can hit that window, so "one
    pull" was not guaranteed. Here the two steps run in that order,
    deterministically.
    """
    layers = [Layer([File(f"f{i}", os.urandom(10_000))]) for i in range(3)]
    image = Image(layers)
    push_image(registry, image, "scale/window:v1", tmp_path)
    store = Store(tmp_path / "state")
    store.ensure_layout()
    puller = Puller(store)
    spec = parse_volume_attributes({"image": f"{registry.host}/scale/window:v1"})
    resolved = puller.resolve(spec.reference, spec.platform, spec.pull_policy, None)
    assert store.image(resolved.key) is None  # what the late publish saw
    first = puller.job_for(resolved, spec.platform).wait(60)  # the pull finishes
    again = puller.job_for(resolved, spec.platform).wait(60)  # the late publish asks
    assert again == first
    wanted = {layer.digest for layer in layers} | {image.config_digest}
    settled(lambda: sum(registry.blob_gets("scale/window").values()), len(wanted) + 1, 2)
    assert registry.blob_gets("scale/window") == Counter(dict.fromkeys(wanted, 1))
