"""`csi-oci serve`: the gRPC server on a unix socket.

The interceptor here is the single place where exceptions become gRPC
statuses (via errors.status_code_for) and where every RPC is logged: one
line with method, status, duration and the request with secrets redacted."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from csi_oci.app import NodeParts, NodeSettings, build_node_parts
from csi_oci.csi.controller import ControllerService
from csi_oci.csi.identity import IdentityService
from csi_oci.csi.node import NodeService
from csi_oci.csi.redact import one_line, one_line_text
from csi_oci.csi.v1 import csi_pb2_grpc
from csi_oci.errors import CsiOciError, InvalidArgument, status_code_for
from csi_oci.prewarm.kube import KubeApi
from csi_oci.prewarm.summary import Summarizer
from csi_oci.prewarm.warmer import Prewarmer
from csi_oci.telemetry import endpoint as telemetry_endpoint
from csi_oci.telemetry import instruments

log = logging.getLogger("csi_oci.rpc")


MAX_WORKERS = 32  # publishes wait on pulls; Probe must still get a thread


SHUTDOWN_DEADLINE = 20.0  # seconds from SIGTERM to a forced exit


def socket_path(endpoint: str) -> str:
    """`unix:///csi/csi.sock`, `unix:/csi/csi.sock` or a bare path -> the path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    elif "://" in endpoint:
        raise InvalidArgument(f"endpoint {endpoint!r}: only unix sockets are supported")
    else:
        path = endpoint
    if not path.startswith("/"):
        raise InvalidArgument(f"endpoint {endpoint!r}: socket path must be absolute")
    return path


def remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"endpoint {path} exists and is not a socket; refusing to remove it")
    os.unlink(path)


def _rpc_fields(
    method: str, code: grpc.StatusCode, elapsed: float, request: str, error: str | None
) -> dict[str, object]:
    """The RPC's fields as their own keys in JSON log lines (logs.py)."""
    fields: dict[str, object] = {
        "rpc": method,
        "code": code.name,
        "duration_seconds": round(elapsed, 3),
        "request": request,
    }
    if error is not None:
        fields["error"] = error
    return fields


def _count_rpc(method: str, code: grpc.StatusCode, elapsed: float) -> None:
    instruments.RPCS.labels(method, code.name).inc()
    instruments.RPC_DURATION.labels(method).observe(elapsed)


if TYPE_CHECKING:  # generic in grpc-stubs only; not subscriptable at run time
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor


class _RpcInterceptor(_ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def logged(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                response = inner(request, context)
            except BaseException as exc:
                code = status_code_for(exc)
                message = str(exc) if isinstance(exc, CsiOciError) else f"internal error: {exc!r}"
                if isinstance(exc, NotImplementedError):
                    code, message = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented"
                # kubelet shows this as one pod event: one line, no URL secrets.
                message = one_line_text(message)
                elapsed = time.monotonic() - started
                rendered = one_line(request)
                level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
                log.log(
                    level,
                    "rpc=%s code=%s duration=%.3fs error=%r request={%s}",
                    method,
                    code.name,
                    elapsed,
                    message,
                    rendered,
                    exc_info=code == grpc.StatusCode.INTERNAL,
                    extra=_rpc_fields(method, code, elapsed, rendered, message),
                )
                _count_rpc(method, code, elapsed)
                context.abort(code, message)
            elapsed = time.monotonic() - started
            rendered = one_line(request)
            log.info(
                "rpc=%s code=OK duration=%.3fs request={%s}",
                method,
                elapsed,
                rendered,
                extra=_rpc_fields(method, grpc.StatusCode.OK, elapsed, rendered, None),
            )
            _count_rpc(method, grpc.StatusCode.OK, elapsed)
            return response

        return grpc.unary_unary_rpc_method_handler(
            logged,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class ServeOptions:
    endpoint: str
    node_id: str
    driver_name: str
    mode: str  # node | controller | all
    node: NodeSettings
    metrics_address: str = ""  # host:port of /metrics and /healthz; "" disables them
    metrics_image_labels: bool = False  # label lazy metrics by image and digest
    prewarm: bool = False  # watch ImageCaches (csi_oci.prewarm)
    namespace: str = ""  # the driver's namespace (ImageCache pullSecrets live there)
    kubeconfig: str | None = None  # None: the pod's service account


def build_server(opts: ServeOptions) -> tuple[grpc.Server, NodeParts | None]:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="rpc"),
        interceptors=[_RpcInterceptor()],
    )
    parts = None
    with_node = opts.mode in ("node", "all")
    with_controller = opts.mode in ("controller", "all")
    if with_node:
        if not opts.node_id:
            raise InvalidArgument("--node-id is required in node mode")
        parts = build_node_parts(opts.node)
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeService(opts.node_id, parts.volumes, parts.node_credentials), server
        )
        ready = parts.store.usable
    else:

        def ready() -> bool:
            return True

    if with_controller:
        csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(opts.driver_name), server)
    csi_pb2_grpc.add_IdentityServicer_to_server(
        IdentityService(opts.driver_name, controller=with_controller, ready=ready), server
    )
    return server, parts


LAZY_WATCHDOG_SECONDS = 2.0


def _start_lazy_watchdog(parts: NodeParts) -> None:
    """Every few seconds: restart dead lazy filesystems and rebind their volumes."""

    def run() -> None:
        while True:
            time.sleep(LAZY_WATCHDOG_SECONDS)
            try:
                parts.volumes.check_lazy()
            except Exception:  # the watchdog must survive anything
                logging.getLogger("csi_oci").exception("lazy watchdog")

    threading.Thread(target=run, name="lazy-watchdog", daemon=True).start()


def _start_prewarm(opts: ServeOptions, parts: NodeParts | None) -> None:
    """The node's pre-warmer and (controller) the ImageCache summary; without API
    access they are off, logged, and volumes are served all the same."""
    main_log = logging.getLogger("csi_oci")
    try:
        api = KubeApi(opts.kubeconfig)
    except Exception as exc:
        main_log.error("pre-warm is off: no access to the Kubernetes API (%s)", exc)
        return
    if parts is not None:
        if not opts.namespace:
            main_log.warning("pre-warm: no --namespace; ImageCache pullSecrets cannot be read")
        Prewarmer(
            opts.node_id,
            opts.namespace,
            api,
            parts.store,
            parts.puller,
            parts.volumes.signatures,
            parts.node_credentials,
            parts.volumes,
        ).start()
        main_log.info("pre-warm: watching ImageCaches for node %s", opts.node_id)
    if opts.mode in ("controller", "all"):
        Summarizer(api).start()


def _start_metrics(
    opts: ServeOptions, socket_file: str, parts: NodeParts | None, serving: threading.Event
) -> telemetry_endpoint.MetricsServer | None:
    """/metrics and /healthz; a port that cannot be bound disables them, not the driver.

    Volumes matter more than metrics: a port clash (hostNetwork) is logged
    as an error and, with no /healthz, shows up as a failing kubelet probe.
    """
    if not opts.metrics_address:
        return None
    checks = [telemetry_endpoint.grpc_socket_check(socket_file, serving)]
    node = None
    if parts is not None:
        checks.append(telemetry_endpoint.state_dir_check(parts.store))
        node = telemetry_endpoint.NodeCollector(
            parts.store, parts.volumes.records, image_labels=opts.metrics_image_labels
        )
    try:
        metrics_server = telemetry_endpoint.MetricsServer(opts.metrics_address, checks, node)
    except (OSError, ValueError) as exc:
        logging.getLogger("csi_oci").error(
            "metrics and /healthz are disabled: cannot listen on %s: %s", opts.metrics_address, exc
        )
        return None
    metrics_server.start()
    logging.getLogger("csi_oci").info(
        "metrics on %s (port %d): /metrics, /healthz", opts.metrics_address, metrics_server.port
    )
    return metrics_server


def serve(opts: ServeOptions) -> int:
    # Block SIGTERM/SIGINT before any thread exists, so every thread inherits
    # the mask and the main thread alone takes them, synchronously, with
    # sigwait. With a Python signal handler instead, the kernel may deliver
    # the signal to a gRPC thread while the main thread sleeps in a futex and
    # never runs the handler: the driver would ignore SIGTERM.
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    path = socket_path(opts.endpoint)
    remove_stale_socket(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    server, parts = build_server(opts)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    main_log = logging.getLogger("csi_oci")
    serving = threading.Event()
    serving.set()
    metrics_server = _start_metrics(opts, path, parts, serving)
    if opts.prewarm:
        _start_prewarm(opts, parts)
    if parts is not None and not opts.node.lazy_external:
        _start_lazy_watchdog(parts)  # else the lazy-server container watches them
        if parts.volumes.lazy is not None:
            parts.volumes.lazy.prepare_standby()
    main_log.info(
        "csi-oci %s serving %s on %s (node %s, state %s)",
        opts.driver_name,
        opts.mode,
        path,
        opts.node_id or "-",
        opts.node.state_dir,
    )
    while (signum := signal.sigwait(signals)) == signal.SIGHUP:
        main_log.info("received SIGHUP: reloading the registry configuration")
        if parts is not None:
            parts.registries.reload()
    main_log.info("received %s, shutting down", signal.Signals(signum).name)
    # A node plugin that ignores SIGTERM blocks node drains and DaemonSet
    # rollouts. Should a graceful stop ever hang, print every thread's stack
    # (the diagnosis) and exit anyway.
    faulthandler.dump_traceback_later(SHUTDOWN_DEADLINE, exit=True)
    serving.clear()  # /healthz answers 503 from now on
    server.stop(grace=5).wait()
    if metrics_server is not None:
        metrics_server.stop()
    if parts is not None:
        try:
            parts.store.durable.flush()  # what a restart would otherwise re-check
        except OSError as exc:
            main_log.warning("final flush of the store failed: %s", exc)
    remove_stale_socket(path)
    main_log.info("stopped")
    return 0
