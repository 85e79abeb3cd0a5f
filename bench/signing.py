"""What the signature policy costs a publish (measured, never asserted).

    .venv/bin/python -m bench.signing            # hack/bench signing
    .venv/bin/python -m bench.signing --reps 30 --model-mib 1024

Real signatures made by the real tools (cosign 2.5.3, notation 1.3.2,
model-signing 1.1.1; tests/support/signing.py) in a loopback olareg
registry (OCI 1.1 referrers API). For each kind of signature:

  * fresh: csi-oci's check (SignatureCheck.check) with an empty result
    cache: find the signatures in the registry (tag, referrers API and
    fallback tag), fetch them by digest, verify;
  * cached: the same check again (the result cached in memory), and from
    the result file alone (a restarted driver);
  * the peer: the tool's own `verify` of the same signature, in the same run
    (a process each time, as a CI step or an admission webhook call would).

Then a whole warm NodePublishVolume (image in the store, result cached)
through a real `csi-oci serve`, with and without a policy, and the
model-signing check of a whole model against `model_signing verify`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from csi_oci.oci.config import ConfigSource
from csi_oci.spec.reference import parse_reference
from csi_oci.verify.policy import parse_policy
from csi_oci.verify.verifier import SignatureCheck, Subject
from tests.support import signing as S
from tests.support.driver import Driver


def say(msg: str) -> None:
    print(f"bench.signing: {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], object], reps: int) -> dict[str, float]:
    """Median and p90 of `reps` calls, in milliseconds."""
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 2),
        "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 2),
        "min_ms": round(samples[0], 2),
        "reps": reps,
    }


class Case:
    """One signed image and the rule that trusts its signer."""

    def __init__(self, name: str, ref: str, digest: str, policy: str, root: Path) -> None:
        path = root / f"{name}.toml"
        path.write_text(policy)
        self.name = name
        self.rules = parse_policy(policy, path).rules
        self.subject = Subject(parse_reference(ref), digest, None, digest)
        self.root = root

    def check(self, cache_dir: Path) -> SignatureCheck:
        return SignatureCheck(_NoPolicy(), cache_dir, ConfigSource(None))

    def fresh(self) -> None:
        with tempfile.TemporaryDirectory(dir=self.root) as cache:
            results = self.check(Path(cache)).check(self.subject, self.rules, None)
        assert results and results[0].outcome == "verified", results

    def cached(self, check: SignatureCheck) -> None:
        results = check.check(self.subject, self.rules, None)
        assert results[0].outcome == "cached", results


class _NoPolicy:
    """SignatureCheck reads rules from its PolicySource only in rules_for (unused here)."""

    def current(self) -> None:
        return None


def peer(args: list[str], env: dict[str, str], cwd: Path) -> Callable[[], None]:
    def run() -> None:
        proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr.decode()[-500:]}")

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--model-mib", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path(".cache/bench/signing.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="csi-oci-bench-signing-"))
    reg = S.OlaregRegistry(work / "olareg")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "reps": args.reps,
        "cases": {},
    }
    try:
        cases, peers = make_cases(reg, work)
        for case in cases:
            say(f"{case.name}: fresh x{args.reps}")
            row: dict[str, Any] = {"fresh": timed(case.fresh, args.reps)}
            cache_dir = work / f"cache-{case.name}"
            warm = case.check(cache_dir)
            warm.check(case.subject, case.rules, None)
            row["cached_in_memory"] = timed(lambda c=case, w=warm: c.cached(w), args.reps)
            row["cached_on_disk"] = timed(
                lambda c=case, d=cache_dir: c.cached(c.check(d)), args.reps
            )
            if case.name in peers:
                tool, run = peers[case.name]
                say(f"{case.name}: {tool} verify x{min(args.reps, 10)}")
                row["peer"] = {"tool": tool, **timed(run, min(args.reps, 10))}
            report["cases"][case.name] = row
        report["publish"] = warm_publish(reg, work, args.reps)
        report["model_signing"] = model_tree(work, args.model_mib)
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def make_cases(
    reg: S.OlaregRegistry, work: Path
) -> tuple[list[Case], dict[str, tuple[str, Callable[[], None]]]]:
    key = S.generate_key_pair("ecdsa-p256", work / "keys", "release")
    ckey = S.cosign_import_key(key, work, name="release")
    pki = S.make_pki(work / "pki", emails=("release@acme.test",))
    leaf = S.cosign_import_key(pki.leaf.key, work, name="leaf")
    env = S.cosign_env(work)
    cosign = S.find_producer("cosign")
    cases: list[Case] = []
    peers: dict[str, tuple[str, Callable[[], None]]] = {}

    def image(n: str) -> Any:
        return S.push_tiny_image(reg, f"bench/{n}:v1", content=f"{n}\n".encode())

    keyed = image("keyed")
    S.cosign_sign_key(reg, keyed, work, ckey)
    rule_key = (
        f'[[rule]]\nname = "k"\nmatch = ["*"]\n[[rule.require]]\ntype = "cosign"\n'
        f'keys = ["{key.public_path}"]\n'
    )
    cases.append(Case("cosign-key", keyed.reference, keyed.digest, rule_key, work))
    peers["cosign-key"] = (
        "cosign 2.5.3",
        peer(
            [cosign, "verify", "--key", str(key.public_path), "--insecure-ignore-tlog",
             "--allow-http-registry", f"{reg.host}/{keyed.repo}@{keyed.digest}"],
            env, work,
        ),
    )  # fmt: skip
    certed = image("certificate")
    S.cosign_sign_cert(reg, certed, work, leaf, pki)
    rule_cert = (
        f'[[rule]]\nname = "c"\nmatch = ["*"]\n[[rule.require]]\ntype = "cosign"\n'
        f'roots = ["{pki.root_path}"]\nidentities = [{{ san = "release@acme\\\\.test" }}]\n'
    )
    cases.append(Case("cosign-certificate", certed.reference, certed.digest, rule_cert, work))
    bundled = image("bundle")
    S.cosign_sign_bundle(reg, bundled, work, ckey)
    cases.append(Case("cosign-bundle", bundled.reference, bundled.digest, rule_key, work))
    notation = S.notation_setup(work / "notation", pki)
    for fmt in ("jws", "cose"):
        signed = image(f"notation-{fmt}")
        S.notation_sign(reg, signed, notation, signature_format=fmt)
        rule = (
            f'[[rule]]\nname = "n"\nmatch = ["*"]\n[[rule.require]]\ntype = "notation"\n'
            f'roots = ["{pki.root_path}"]\nidentities = [{{ san = "release@acme\\\\.test" }}]\n'
        )
        cases.append(Case(f"notation-{fmt}", signed.reference, signed.digest, rule, work))
        repo_digest = f"{reg.host}/{signed.repo}@{signed.digest}"
        peers[f"notation-{fmt}"] = (
            "notation 1.3.2",
            peer(
                [S.find_producer("notation"), "verify", "--insecure-registry", repo_digest],
                S.tool_env(notation.workdir),
                notation.workdir,
            ),
        )
    return cases, peers


def warm_publish(reg: S.OlaregRegistry, work: Path, reps: int) -> dict[str, Any]:
    """NodePublishVolume of an image already in the store, result cached: with and
    without a policy, interleaved, on two drivers."""
    key = S.generate_key_pair("ecdsa-p256", work / "keys", "publish")
    signed = S.push_tiny_image(reg, "bench/publish:v1", content=b"publish\n")
    S.cosign_sign_key(reg, signed, work, S.cosign_import_key(key, work, name="publish"))
    policy = work / "publish.toml"
    policy.write_text(
        f'[[rule]]\nname = "p"\nmatch = ["*"]\n[[rule.require]]\ntype = "cosign"\n'
        f'keys = ["{key.public_path}"]\n'
    )
    drivers = {
        "with_policy": Driver(work / "d-policy", extra_args=["--policy-config", str(policy)]),
        "without_policy": Driver(work / "d-plain"),
    }
    out: dict[str, Any] = {}
    try:
        samples: dict[str, list[float]] = {name: [] for name in drivers}
        for i in range(reps + 1):
            for name, d in drivers.items():
                target = work / f"t-{name}-{i}" / "mount"
                target.parent.mkdir(parents=True)
                started = time.perf_counter()
                d.publish(
                    target,
                    {"image": signed.reference, "pullPolicy": "IfNotPresent"},
                    volume_id=f"v{i}",
                )
                if i:  # the first publish pulls and verifies
                    samples[name].append((time.perf_counter() - started) * 1000)
                d.unpublish(target, volume_id=f"v{i}")
        for name, values in samples.items():
            values.sort()
            out[name] = {
                "median_ms": round(statistics.median(values), 2),
                "p90_ms": round(values[int(0.9 * (len(values) - 1))], 2),
            }
    finally:
        for d in drivers.values():
            d.stop()
    return out


def model_tree(work: Path, mib: int) -> dict[str, Any]:
    """model-signing over a model of `mib` MiB in 8 files: csi-oci's check against
    `model_signing verify key`, page cache warm for both (the tree was just written)."""
    from csi_oci.verify import models

    model = work / "model"
    shard = (mib << 20) // 8
    for i in range(8):
        (model / "weights").mkdir(parents=True, exist_ok=True)
        with open(model / "weights" / f"part-{i}.bin", "wb") as f:
            for _ in range(shard >> 20):
                f.write(os.urandom(1 << 20))
    (model / "config.json").write_text('{"layers": 8}')
    key = S.generate_key_pair("ecdsa-p256", work / "keys", "model")
    sig = S.model_sign(model, work, key=key)
    policy = work / "model.toml"
    policy.write_text(
        f'[[rule]]\nname = "m"\nmatch = ["*"]\n[[rule.require]]\ntype = "model-signing"\n'
        f'keys = ["{key.public_path}"]\n'
    )
    requirement = parse_policy(policy.read_text(), policy).rules[0].requires[0]
    data = sig.path.read_bytes()
    ours = timed(lambda: models.verify_model_tree(model, data, requirement, source="bench"), 3)
    cli = S.model_signing_cli()
    theirs = timed(
        peer([cli, "verify", "key", str(model), "--signature", str(sig.path), "--public_key",
              str(key.public_path)], dict(os.environ), work),
        3,
    )  # fmt: skip
    return {"model_mib": mib, "files": 9, "csi-oci": ours, "model_signing verify": theirs}


if __name__ == "__main__":
    sys.exit(main())
