"""HTTP front end: OpenAI, llama.cpp and LightLLM endpoints over an ``AsyncEngineAPI``."""

from llama_mpi.mpi_server.http.app import attach_engine, create_app, server_state

__all__ = ["attach_engine", "create_app", "server_state"]
