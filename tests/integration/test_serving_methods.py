"""Every service is reachable through its generic handler, and grpc.aio keeps no task per method.

serving/services/generic_only.py says why the server registers no methods: grpc.aio waits on one
pending task per registered method for every call that arrives.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.api import grpc_service_pb2 as oip
from serving.api import grpc_service_pb2_grpc as oip_grpc
from serving.server import SERVICE_NAME


async def _pending_server_coroutines() -> list[str]:
    return sorted(t.get_coro().__qualname__ for t in asyncio.all_tasks()
                  if "_request" in getattr(t.get_coro(), "__qualname__", ""))


def test_each_service_answers_and_the_server_waits_on_one_request_task(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.server.port}") as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest()).live
        assert server.client().list_models()
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        listed = {s.name for reply in replies for s in reply.list_services_response.service}
    assert listed == {SERVICE_NAME, "inference.GRPCInferenceService", "grpc.health.v1.Health",
                      "grpc.reflection.v1alpha.ServerReflection"}
    # One task waits for the next call of any method; none per registered method.
    assert server.call(_pending_server_coroutines()) == ["AioServer._request_call"]
