"""The `deepseek.v1` gRPC stubs for the Python checks and benchmarks, generated from
proto/deepseek/v1/inference.proto with grpcio-tools into a directory of the caller's."""

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def generate(out_dir):
    """Writes the stubs into `out_dir` and returns the (messages, services) modules."""
    proto_dir = ROOT / "proto"
    code = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                        str(proto_dir / "deepseek/v1/inference.proto")])
    if code != 0:
        raise SystemExit("FAILED: generating the gRPC stubs")
    sys.path.insert(0, str(out_dir))
    from deepseek.v1 import inference_pb2, inference_pb2_grpc
    return inference_pb2, inference_pb2_grpc
