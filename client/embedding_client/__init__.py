"""Client for the ``embedding.v1.EmbeddingService`` gRPC API.

``EmbeddingClient`` (threads) and ``AsyncEmbeddingClient`` (asyncio) return float32 numpy arrays,
split long lists under the server's limits, retry UNAVAILABLE / RESOURCE_EXHAUSTED through gRPC's
service config, spread calls over replicas with round_robin, and raise one exception hierarchy.
"""

from embedding_client._codec import EmbedParams, EmbedResult, ModelInfo, Tokenized
from embedding_client.aio import AsyncEmbeddingClient
from embedding_client.client import EmbeddingClient
from embedding_client.errors import (
    Cancelled,
    DeadlineExceeded,
    EmbeddingError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from embedding_client.options import RetryPolicy, TLSConfig

__all__ = [
    "AsyncEmbeddingClient",
    "Cancelled",
    "DeadlineExceeded",
    "EmbedParams",
    "EmbedResult",
    "EmbeddingClient",
    "EmbeddingError",
    "InvalidInput",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "PermissionDenied",
    "RetryPolicy",
    "ServerError",
    "TLSConfig",
    "Tokenized",
    "Unauthenticated",
    "Unavailable",
]
__version__ = "0.1.0"
