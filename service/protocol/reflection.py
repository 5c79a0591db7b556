"""Server reflection over every service served, from one descriptor pool.

grpc_reflection reads one pool, but the served files live in two: KServe's, health's and
reflection's in protobuf's default pool, TF Serving's in tf_pool.POOL (TensorFlow, where
installed, owns those names in the default one). So reflection gets a pool of its own
holding copies of the served services' files and everything they import.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2


def served_files(services: Iterable[ServiceDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool with the services' files and their imports (each name once, imports first)."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for service in services:
        add(service.file)
    return pool


def enable(server: grpc.aio.Server, services: Iterable[ServiceDescriptor]) -> None:
    """Serve reflection of `services` and of reflection itself."""
    services = [*services, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
    reflection.enable_server_reflection([s.full_name for s in services], server,
                                        pool=served_files(services))
