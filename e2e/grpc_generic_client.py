#!/usr/bin/env python3
"""A gRPC client that knows only proto/: it calls every RPC of a live gateway.

It generates Python stubs from proto/openshell/v1/openshell.proto at run time
(nothing generated is committed), starts `openshell gateway start` on a free
loopback port with an in-memory database, calls every RPC of
openshell.v1.OpenShell through the stubs and checks each answer, checks server
reflection, and stops the gateway with SIGTERM. It fails when the proto's
service has an RPC this script never called, so a new RPC needs a check here.

    .venv/bin/python e2e/grpc_generic_client.py --openshell target/debug/openshell \
        --proto-dir proto --wasm target/wasm32-wasip2/release/fixture_echo.wasm

Prints one line per check and ends with `N passed, M failed`; exits 1 on any
failure. Needs grpcio, grpcio-tools and grpcio-reflection (`just setup`).
"""

import argparse
import importlib
import importlib.resources
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import grpc
from grpc_tools import protoc

SERVICE = "openshell.v1.OpenShell"
# Deadline of one unary call.
TIMEOUT = 30


class Checks:
    """Runs named checks, prints one line each, and counts them."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def run(self, name, fn):
        """Runs fn(); its return value is the detail printed on success."""
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 - any failure is a failed check
            self.failed += 1
            print(f"FAIL {name}: {describe(e)}", flush=True)
            traceback.print_exc(file=sys.stderr)
            return False
        self.passed += 1
        print(f"ok   {name}" + (f": {detail}" if detail else ""), flush=True)
        return True


def describe(e):
    if isinstance(e, grpc.RpcError):
        return f"{e.code()} {e.details()}"
    return f"{type(e).__name__}: {e}"


class RecordingStub:
    """The generated stub, remembering which RPCs were called."""

    def __init__(self, stub):
        self._stub = stub
        self.called = set()

    def __getattr__(self, rpc):
        method = getattr(self._stub, rpc)
        self.called.add(rpc)
        return method


def generate_stubs(proto_dir, out_dir):
    """Runs grpc_tools.protoc on every file in proto/ (so imports resolve);
    returns the modules generated from openshell.proto: (pb2, pb2_grpc)."""
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    files = sorted(
        os.path.relpath(os.path.join(root, name), proto_dir)
        for root, _, names in os.walk(proto_dir)
        for name in names
        if name.endswith(".proto")
    )
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *files,
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {files} in {proto_dir}")
    sys.path.insert(0, out_dir)
    pb2 = importlib.import_module("openshell.v1.openshell_pb2")
    pb2_grpc = importlib.import_module("openshell.v1.openshell_pb2_grpc")
    return pb2, pb2_grpc


class Gateway:
    """`openshell gateway start` on a free port; stop() sends SIGTERM."""

    def __init__(self, binary, state_dir):
        self.log_path = os.path.join(state_dir, "gateway.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSHELL_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary, "gateway", "start",
                    "--port", "0",
                    "--db-url", "sqlite::memory:",
                    "--state-dir", os.path.join(state_dir, "state"),
                    "--disable-tls", "--disable-gateway-auth",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
            )
        # Read stdout on a thread so a silent gateway cannot hang us, and keep
        # draining it so the gateway never writes into a closed pipe.
        self.lines = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            line = self.lines.get(timeout=60)
        except queue.Empty:
            line = None
        prefix = "Server listening on "
        if not line or not line.startswith(prefix):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(
                f"the gateway did not say where it listens (got {line!r}); log:\n{self.log()}"
            )
        self.addr = line[len(prefix):].strip()

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        """SIGTERM, then wait; returns the exit code (kills it if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("the gateway still ran 10 s after SIGTERM; killed it")


def wait_until_gone(stub, pb2, name):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            stub.GetSandbox(pb2.GetSandboxRequest(name=name), timeout=TIMEOUT)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise
        time.sleep(0.05)
    raise AssertionError(f"sandbox {name} still exists 60 s after DeleteSandbox")


def check_rpcs(checks, stub, pb2, wasm):
    """One check per RPC, in an order where each builds on the last."""
    Phase = pb2.SandboxPhase
    state = {}

    def health():
        r = stub.Health(pb2.HealthRequest(), timeout=TIMEOUT)
        assert r.status == "SERVING", r
        assert r.version, "an empty version"
        assert list(r.drivers) == [], f"a fresh gateway has no drivers: {r.drivers}"
        return f"{r.status}, version {r.version}"

    def load_plugin():
        with open(wasm, "rb") as f:
            component = f.read()
        r = stub.LoadPlugin(
            pb2.LoadPluginRequest(name="echo", component=component, grants=["log", "files"]),
            timeout=TIMEOUT,
        )
        p = r.plugin
        assert p.name == "echo", p
        assert not r.replaced, "nothing was loaded before"
        assert sorted(p.grants) == ["files", "log"], p.grants
        assert set(p.imports) <= set(p.grants), (p.imports, p.grants)
        assert len(p.digest) == 64 and all(c in "0123456789abcdef" for c in p.digest), p.digest
        state["digest"] = p.digest
        return f"echo {p.version}, sha256:{p.digest[:7]}"

    def list_plugins():
        r = stub.ListPlugins(pb2.ListPluginsRequest(), timeout=TIMEOUT)
        assert [p.name for p in r.plugins] == ["echo"], r
        assert r.plugins[0].digest == state["digest"], r
        assert r.plugins[0].sandboxes == 0, r
        return "echo"

    def create_sandbox():
        r = stub.CreateSandbox(
            pb2.CreateSandboxRequest(
                name="g1",
                spec=pb2.SandboxSpec(environment={"GREETING": "hi"}),
                request_id="grpc-generic-1",
            ),
            timeout=TIMEOUT,
        )
        sb = r.sandbox
        assert sb.name == "g1", sb
        assert sb.id, "no id"
        assert sb.spec.driver == "echo", "the only driver is the default"
        assert sb.phase == Phase.SANDBOX_PHASE_PROVISIONING, Phase.Name(sb.phase)
        assert dict(sb.spec.environment) == {"GREETING": "hi"}, sb.spec
        # None asked: the gateway's default is stored (root's gateway has a
        # sandbox disk; without one there is no size).
        assert sb.spec.disk_gib == (8 if os.geteuid() == 0 else 0), sb.spec
        # Idempotent with the same request_id.
        again = stub.CreateSandbox(
            pb2.CreateSandboxRequest(name="g1", request_id="grpc-generic-1"), timeout=TIMEOUT
        )
        assert again.sandbox.id == sb.id, (again.sandbox.id, sb.id)
        state["id"] = sb.id
        return f"g1 {Phase.Name(sb.phase)}"

    def create_sandbox_with_too_big_a_disk():
        try:
            stub.CreateSandbox(
                pb2.CreateSandboxRequest(name="g2", spec=pb2.SandboxSpec(disk_gib=1 << 20)),
                timeout=TIMEOUT,
            )
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, describe(e)
            assert "disk_gib = 1048576" in e.details(), e.details()
            return f"INVALID_ARGUMENT: {e.details()}"
        raise AssertionError("a 1 PiB sandbox was accepted")

    def get_sandbox():
        by_name = stub.GetSandbox(pb2.GetSandboxRequest(name="g1"), timeout=TIMEOUT).sandbox
        by_id = stub.GetSandbox(pb2.GetSandboxRequest(name=state["id"]), timeout=TIMEOUT).sandbox
        assert by_name.id == state["id"] and by_id.name == "g1", (by_name, by_id)
        assert by_name.phase != Phase.SANDBOX_PHASE_READY, "no sandbox can be Ready yet"
        return f"g1 revision {by_name.revision}"

    def get_unknown_sandbox():
        try:
            stub.GetSandbox(pb2.GetSandboxRequest(name="nosuch"), timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e.code()
            assert "nosuch" in e.details(), e.details()
            return "NOT_FOUND"
        raise AssertionError("GetSandbox(nosuch) succeeded")

    def list_sandboxes():
        r = stub.ListSandboxes(pb2.ListSandboxesRequest(), timeout=TIMEOUT)
        assert [s.name for s in r.sandboxes] == ["g1"], r
        assert r.total == 1, r.total
        return "g1"

    def watch_sandbox():
        call = stub.WatchSandbox(pb2.WatchSandboxRequest(name="g1"), timeout=TIMEOUT)
        try:
            first = next(call)
        finally:
            call.cancel()
        assert first.WhichOneof("event") == "sandbox", first
        assert first.sandbox.name == "g1", first
        return f"first event: g1 {Phase.Name(first.sandbox.phase)}"

    def exec_sandbox_not_ready():
        # No sandbox can be READY yet (there is no supervisor), so the
        # contract's answer is FAILED_PRECONDITION: wrong phase.
        start = pb2.ExecClientMessage(start=pb2.ExecStart(sandbox="g1", argv=["true"]))
        call = stub.ExecSandbox(iter([start]), timeout=TIMEOUT)
        try:
            got = list(call)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, describe(e)
            return f"FAILED_PRECONDITION: {e.details()}"
        raise AssertionError(f"exec in a sandbox that is not READY answered {got}")

    def ssh_tunnel_not_ready():
        # Like exec, an SSH tunnel rides a relay the supervisor opens: the
        # sandbox must be READY first.
        first = pb2.SshTunnelFrame(sandbox="g1")
        call = stub.SshTunnel(iter([first]), timeout=TIMEOUT)
        try:
            got = list(call)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, describe(e)
            return f"FAILED_PRECONDITION: {e.details()}"
        raise AssertionError(f"an SSH tunnel to a sandbox that is not READY answered {got}")

    def get_ssh_host_key_without_supervisor():
        # The host key is whatever the live supervisor reported; there is none.
        try:
            r = stub.GetSshHostKey(pb2.GetSshHostKeyRequest(name="g1"), timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, describe(e)
            assert "not connected" in e.details(), e.details()
            return f"FAILED_PRECONDITION: {e.details()}"
        raise AssertionError(f"a host key without a supervisor: {r}")

    def upload_files_not_ready():
        # Files ride a relay too: the sandbox must be READY.
        start = pb2.UploadFilesMessage(start=pb2.UploadFilesStart(sandbox="g1", path="/sandbox"))
        try:
            r = stub.UploadFiles(iter([start]), timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, describe(e)
            return f"FAILED_PRECONDITION: {e.details()}"
        raise AssertionError(f"an upload to a sandbox that is not READY answered {r}")

    def download_files_not_ready():
        try:
            got = list(stub.DownloadFiles(pb2.DownloadFilesRequest(sandbox="g1", path="/sandbox"), timeout=TIMEOUT))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, describe(e)
            return f"FAILED_PRECONDITION: {e.details()}"
        raise AssertionError(f"a download from a sandbox that is not READY answered {got}")

    def forward_tcp_bad_port():
        first = pb2.ForwardTcpFrame(start=pb2.ForwardTcpStart(sandbox="g1", port=70000))
        try:
            got = list(stub.ForwardTcp(iter([first]), timeout=TIMEOUT))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, describe(e)
            assert "70000" in e.details(), describe(e)
            return f"INVALID_ARGUMENT: {e.details()}"
        raise AssertionError(f"a forward to port 70000 answered {got}")

    def stop_sandbox_not_ready():
        # Only a READY sandbox stops; g1 is still being launched.
        try:
            r = stub.StopSandbox(pb2.StopSandboxRequest(name="g1"), timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, describe(e)
            return f"FAILED_PRECONDITION: {e.details()}"
        raise AssertionError(f"a sandbox that is not READY was stopped: {r}")

    def start_sandbox_provisioning():
        # Idempotent: starting one that is already starting changes nothing.
        before = stub.GetSandbox(pb2.GetSandboxRequest(name="g1"), timeout=TIMEOUT).sandbox
        r = stub.StartSandbox(pb2.StartSandboxRequest(name="g1"), timeout=TIMEOUT)
        assert r.sandbox.id == state["id"], r
        assert r.sandbox.revision == before.revision, (before.revision, r.sandbox.revision)
        return f"g1 {Phase.Name(r.sandbox.phase)}, revision {r.sandbox.revision} unchanged"

    def get_sandbox_stats():
        r = stub.GetSandboxStats(pb2.GetSandboxStatsRequest(name="g1"), timeout=TIMEOUT)
        return f"{r}".replace("\n", " ")[:120] or "empty"

    def get_sandbox_policy():
        r = stub.GetSandboxPolicy(pb2.GetSandboxPolicyRequest(name="g1"), timeout=TIMEOUT)
        assert r.policy.source == "none" and r.policy.revision == 0, r
        return "none: nothing reachable"

    def set_sandbox_policy():
        bad = "version: 1\nnetwork_policies:\n  x:\n    endpoints:\n      - host: '*.com'\n        port: 443\n"
        try:
            stub.SetSandboxPolicy(pb2.SetSandboxPolicyRequest(name="g1", yaml=bad), timeout=TIMEOUT)
            raise AssertionError("an overly broad host was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, describe(e)
        good = "version: 1\nnetwork_policies:\n  pypi:\n    endpoints:\n      - host: pypi.org\n        port: 443\n"
        r = stub.SetSandboxPolicy(pb2.SetSandboxPolicyRequest(name="g1", yaml=good), timeout=TIMEOUT)
        assert r.policy.revision == 1 and list(r.policy.rules) == ["pypi"], r
        got = stub.GetSandboxPolicy(pb2.GetSandboxPolicyRequest(name="g1"), timeout=TIMEOUT)
        assert got.policy.yaml == good and got.policy.source == "set", got
        return "refused *.com; then revision 1 (pypi)"

    def sandbox_logs():
        records = list(stub.SandboxLogs(pb2.SandboxLogsRequest(name="g1"), timeout=TIMEOUT))
        texts = [r.data.decode() for r in records]
        assert any(t.startswith("created") for t in texts), texts
        assert all(r.source == pb2.LOG_SOURCE_EVENT for r in records), records
        return f"{len(records)} event(s): {texts[0]}"

    def delete_sandbox():
        r = stub.DeleteSandbox(pb2.DeleteSandboxRequest(name="g1"), timeout=TIMEOUT)
        assert r.sandbox.id == state["id"], r
        assert r.sandbox.phase == Phase.SANDBOX_PHASE_DELETING, Phase.Name(r.sandbox.phase)
        wait_until_gone(stub, pb2, "g1")
        left = stub.ListSandboxes(pb2.ListSandboxesRequest(), timeout=TIMEOUT)
        assert left.total == 0 and not left.sandboxes, left
        return "g1 DELETING, then gone"

    def unload_plugin():
        stub.UnloadPlugin(pb2.UnloadPluginRequest(name="echo", force=True), timeout=TIMEOUT)
        left = stub.ListPlugins(pb2.ListPluginsRequest(), timeout=TIMEOUT)
        assert not left.plugins, left
        return "echo"

    def list_images():
        r = stub.ListImages(pb2.ListImagesRequest(), timeout=TIMEOUT)
        assert not r.images, f"a fresh gateway stores no image: {r}"
        return "none stored"

    def pull_image_malformed():
        try:
            for _ in stub.PullImage(pb2.PullImageRequest(reference="UPPER/Case::bad"), timeout=TIMEOUT):
                pass
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, describe(e)
            assert "UPPER/Case::bad" in e.details(), describe(e)
            return f"INVALID_ARGUMENT: {e.details()}"
        raise AssertionError("a malformed reference was pulled")

    def import_image_garbage():
        chunks = iter([pb2.ImportImageChunk(name="example.com/x:v1", data=b"not an archive")])
        try:
            stub.ImportImage(chunks, timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), describe(e)
            assert "the uploaded archive" in e.details() and "/state/" not in e.details(), describe(e)
            left = stub.ListImages(pb2.ListImagesRequest(), timeout=TIMEOUT)
            assert not left.images, left
            return f"{e.code().name}: {e.details()}"
        raise AssertionError("garbage was imported")

    def remove_unknown_image():
        try:
            stub.RemoveImage(pb2.RemoveImageRequest(name="example.com/nope:v1"), timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, describe(e)
            return f"NOT_FOUND: {e.details()}"
        raise AssertionError("an unknown image was removed")

    checks.run("Health", health)
    checks.run("ListImages", list_images)
    checks.run("PullImage of a malformed reference", pull_image_malformed)
    checks.run("ImportImage of garbage", import_image_garbage)
    checks.run("RemoveImage of an unknown image", remove_unknown_image)
    checks.run("LoadPlugin", load_plugin)
    checks.run("ListPlugins", list_plugins)
    checks.run("CreateSandbox", create_sandbox)
    checks.run("CreateSandbox with more disk than the gateway has", create_sandbox_with_too_big_a_disk)
    checks.run("GetSandbox", get_sandbox)
    checks.run("GetSandbox of an unknown name", get_unknown_sandbox)
    checks.run("ListSandboxes", list_sandboxes)
    checks.run("WatchSandbox", watch_sandbox)
    checks.run("ExecSandbox in a sandbox that is not READY", exec_sandbox_not_ready)
    checks.run("SshTunnel to a sandbox that is not READY", ssh_tunnel_not_ready)
    checks.run("GetSshHostKey without a supervisor", get_ssh_host_key_without_supervisor)
    checks.run("UploadFiles to a sandbox that is not READY", upload_files_not_ready)
    checks.run("DownloadFiles from a sandbox that is not READY", download_files_not_ready)
    checks.run("ForwardTcp to port 70000", forward_tcp_bad_port)
    checks.run("GetSandboxPolicy", get_sandbox_policy)
    checks.run("SetSandboxPolicy", set_sandbox_policy)
    checks.run("SandboxLogs", sandbox_logs)
    checks.run("StopSandbox of a sandbox that is not READY", stop_sandbox_not_ready)
    checks.run("StartSandbox of a sandbox that is starting", start_sandbox_provisioning)
    checks.run("GetSandboxStats", get_sandbox_stats)
    checks.run("DeleteSandbox", delete_sandbox)
    checks.run("UnloadPlugin", unload_plugin)


def reflection_stub(channel):
    """A ServerReflectionInfo call on grpc.reflection.v1.

    The gateway serves reflection v1; grpcio-reflection ships only v1alpha
    stubs. The two protos are the same messages under another package name,
    so the v1alpha classes encode v1 requests byte for byte.
    """
    try:
        from grpc_reflection.v1 import reflection_pb2  # type: ignore[import-not-found]
    except ImportError:
        from grpc_reflection.v1alpha import reflection_pb2
    info = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return info, reflection_pb2


def check_reflection(checks, channel, service_desc):
    def reflection():
        from google.protobuf import descriptor_pb2

        info, r = reflection_stub(channel)
        answers = list(
            info(
                iter(
                    [
                        r.ServerReflectionRequest(list_services=""),
                        r.ServerReflectionRequest(file_containing_symbol=SERVICE),
                    ]
                ),
                timeout=TIMEOUT,
            )
        )
        assert len(answers) == 2, answers
        services = [s.name for s in answers[0].list_services_response.service]
        assert SERVICE in services, services
        # The served descriptor has exactly the RPCs of proto/.
        served = set()
        for raw in answers[1].file_descriptor_response.file_descriptor_proto:
            f = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for s in f.service:
                if f"{f.package}.{s.name}" == SERVICE:
                    served = {m.name for m in s.method}
        expected = {m.name for m in service_desc.methods}
        assert served == expected, f"served {sorted(served)}, proto/ has {sorted(expected)}"
        return f"services {sorted(services)}"

    checks.run("ServerReflection (v1) lists " + SERVICE, reflection)


def run(args, checks):
    with tempfile.TemporaryDirectory(prefix="openshell-grpc-generic-") as tmp:
        stubs_dir = os.path.join(tmp, "stubs")
        os.mkdir(stubs_dir)
        pb2, pb2_grpc = generate_stubs(os.path.abspath(args.proto_dir), stubs_dir)
        service_desc = pb2.DESCRIPTOR.services_by_name["OpenShell"]

        gateway = Gateway(os.path.abspath(args.openshell), tmp)
        try:
            print(f"gateway listening on {gateway.addr}", flush=True)
            with grpc.insecure_channel(gateway.addr) as channel:
                stub = RecordingStub(pb2_grpc.OpenShellStub(channel))
                check_rpcs(checks, stub, pb2, args.wasm)
                check_reflection(checks, channel, service_desc)

            def every_rpc_exercised():
                missing = sorted({m.name for m in service_desc.methods} - stub.called)
                assert not missing, f"never called: {missing}; add a check for each"
                return f"{len(service_desc.methods)} RPCs"

            checks.run("every RPC of " + SERVICE + " exercised", every_rpc_exercised)
        finally:

            def clean_shutdown():
                code = gateway.stop()
                assert code == 0, f"the gateway exited {code} after SIGTERM"
                return "exit 0 on SIGTERM"

            if not checks.run("gateway shutdown", clean_shutdown) or checks.failed:
                print("--- gateway log\n" + gateway.log(), file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--openshell", required=True, help="the openshell binary")
    ap.add_argument("--proto-dir", required=True, help="the proto/ directory")
    ap.add_argument("--wasm", required=True, help="fixture_echo.wasm")
    args = ap.parse_args()

    checks = Checks()
    try:
        run(args, checks)
    except Exception as e:  # noqa: BLE001 - setup failed; report and count it
        checks.failed += 1
        print(f"FAIL setup: {describe(e)}", flush=True)
        traceback.print_exc(file=sys.stderr)
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
