"""The pull benchmark (hack/bench runs ``python -m bench``): csi-oci against its peers
and this machine's limits. Separate from the tests, never part of the wheel.

    bench/__main__.py  the benchmark's command line (hack/bench)
    bench/models.py    synthetic models in every packaging, pushed to a loopback registry
    bench/tools.py     what is timed: csi-oci through the CSI API, and the peers
    bench/limits.py    this machine's limits, measured in the same run
    bench/report.py    bench.json, bench.md and bench.png
    bench/lib.py       cache dropping, the stopwatch, a timed publish
    bench/loader.py    model loaders on lazy mounts against unpack (hack/bench loaders)
    bench/resume.py    resume efficiency through a cutting proxy (python -m bench.resume)
    bench/profile.py   where the CPU goes on the raw artifact (python -m bench.profile)

Run from the repository root (hack/bench does): the test support it reuses is
imported as ``tests.support``.
"""
