"""Flotilla's API driven by a Connect client we did not write: `connectrpc`
from PyPI, with code generated from our protos by protoc-gen-py and
protoc-gen-connectrpc (tests/python_client.rs generates it and runs this).

Usage: connect_client.py BASE_URL TOKEN
Prints one JSON object with what it saw; exits non-zero on any surprise.
"""

import json
import sys

from connectrpc.code import Code
from connectrpc.codec import proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError
from flotilla.v1 import deployments_pb as pb
from flotilla.v1.deployments_connect import DeploymentServiceClientSync
from flotilla.v1.organizations_connect import OrganizationServiceClientSync
from flotilla.v1.organizations_pb import ListOrganizationsRequest


def expect_error(call, code):
    try:
        call()
    except ConnectError as error:
        assert error.code == code, f"expected {code}, got {error.code}: {error.message}"
        return error.message
    raise AssertionError(f"expected {code}, the call succeeded")


def main() -> None:
    base, token = sys.argv[1], sys.argv[2]
    headers = {"authorization": f"Bearer {token}"}
    seen = {}
    # Binary protobuf, requests gzip-compressed (the client's default).
    with DeploymentServiceClientSync(base, codec=proto_binary_codec()) as client:
        created = client.create_deployment(
            pb.CreateDeploymentRequest(
                name="from-python",
                image="flotilla/demo-http:latest",
                port=8080,
                env=[pb.EnvVar(name="LANG_USED", value="python"), pb.EnvVar(name="KEY", value="hidden", secret=True)],
            ),
            headers=headers,
        )
        deployment_id = created.deployment.id
        seen["created"] = deployment_id
        got = client.get_deployment(pb.GetDeploymentRequest(id=deployment_id), headers=headers)
        assert got.deployment.name == "from-python", got
        seen["masked"] = [v.value for v in got.deployment.env if v.secret]
        env = client.get_env_vars(pb.GetEnvVarsRequest(id=deployment_id), headers=headers)
        seen["env"] = sorted(v.name for v in env.vars)
        # The server stream: the current state arrives first.
        stream = client.stream_deployment_status(
            pb.StreamDeploymentStatusRequest(id=deployment_id, max_duration_seconds=2), headers=headers
        )
        first = next(iter(stream))
        seen["streamed"] = first.deployment.id
        seen["not_found"] = expect_error(
            lambda: client.get_deployment(pb.GetDeploymentRequest(id="00000000-0000-0000-0000-000000000000"), headers=headers),
            Code.NOT_FOUND,
        )
        seen["invalid"] = expect_error(
            lambda: client.create_deployment(pb.CreateDeploymentRequest(name="Bad Name", image="x", port=1), headers=headers),
            Code.INVALID_ARGUMENT,
        )
        seen["unauthenticated"] = expect_error(
            lambda: client.get_deployment(pb.GetDeploymentRequest(id=deployment_id)), Code.UNAUTHENTICATED
        )
    # JSON, uncompressed.
    with DeploymentServiceClientSync(base, codec=proto_json_codec(), send_compression=None) as client:
        listed = client.list_deployments(pb.ListDeploymentsRequest(), headers=headers)
        seen["listed"] = [d.name for d in listed.deployments]
        client.delete_deployment(pb.DeleteDeploymentRequest(id=deployment_id), headers=headers)
    with OrganizationServiceClientSync(base) as organizations:
        mine = organizations.list_organizations(ListOrganizationsRequest(), headers=headers)
        seen["organizations"] = len(mine.organizations)
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
