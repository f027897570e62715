"""Drive the real mcp-memory-service the ways Claude Code and the server itself do; run
with the Python of the venv `make test-real` builds (tools/mms_venv.sh), never imported
by the tests (their Python cannot load SQLite extensions).

    python mms_driver.py mcp DB TOOL ARGS_JSON         call one MCP tool over stdio
                                                       (`memory server`, the mcp client)
    python mms_driver.py search DB QUERY [CMD_JSON]    the server's own semantic search
                                                       (storage.retrieve); with CMD_JSON,
                                                       run that command between its read
                                                       of the hits and its metadata write-back
    python mms_driver.py store DB ITEMS_JSON           store [{content, tags, memory_type}]
                                                       through MemoryService, the code
                                                       memory_store's handler runs
    python mms_driver.py init DB                       open the store the way the server
                                                       starts (creates or migrates it)

Each prints one JSON document on stdout. The environment must hold the offline
settings of the server (see tests/test_real_server.py: server_env).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys


async def call_mcp(db: str, tool: str, arguments: dict) -> dict:
    """Call one tool of `memory server` over stdio, as Claude Code does; return
    {"text": the tool's text answer, "is_error"}."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    memory = os.path.join(os.path.dirname(sys.executable), "memory")
    params = StdioServerParameters(command=memory, args=["server"],
                                   env={**os.environ, "MCP_MEMORY_SQLITE_PATH": db})
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool(tool, arguments)
    text = "\n".join(getattr(part, "text", "") for part in result.content)
    return {"text": text, "is_error": bool(result.isError)}


async def storage(db: str):
    from mcp_memory_service.storage.sqlite_vec import SqliteVecMemoryStorage

    store = SqliteVecMemoryStorage(db)
    await store.initialize()
    return store


async def search(db: str, query: str, between: list[str] | None) -> dict:
    """storage.retrieve(query): the path of memory_search's default mode. With between,
    that command runs (to its end) after retrieve read the hits' metadata and before it
    writes that metadata back (its access tracking)."""
    store = await storage(db)
    ran = []
    if between:
        original = store._persist_access_metadata_batch

        async def interleaved(memories):
            ran.append(subprocess.run(between, capture_output=True, text=True, timeout=300).returncode)
            return await original(memories)
        store._persist_access_metadata_batch = interleaved
    try:
        hits = await store.retrieve(query, n_results=5)
    finally:
        store.close() if not asyncio.iscoroutinefunction(store.close) else await store.close()
    return {"hits": [{"content_hash": h.memory.content_hash, "content": h.memory.content,
                      "tags": h.memory.tags} for h in hits], "between_rc": ran}


async def store_items(db: str, items: list[dict]) -> dict:
    from mcp_memory_service.services.memory_service import MemoryService

    store = await storage(db)
    try:
        service = MemoryService(store)
        answers = [await service.store_memory(content=item["content"], tags=item.get("tags", []),
                                              memory_type=item.get("memory_type")) for item in items]
    finally:
        await store.close() if asyncio.iscoroutinefunction(store.close) else store.close()
    return {"answers": json.loads(json.dumps(answers, default=str))}


async def init(db: str) -> dict:
    store = await storage(db)
    await store.close() if asyncio.iscoroutinefunction(store.close) else store.close()
    return {"ok": True}


def main(argv: list[str]) -> int:
    command, db = argv[0], argv[1]
    if command == "mcp":
        out = asyncio.run(call_mcp(db, argv[2], json.loads(argv[3])))
    elif command == "search":
        out = asyncio.run(search(db, argv[2], json.loads(argv[3]) if len(argv) > 3 else None))
    elif command == "store":
        out = asyncio.run(store_items(db, json.loads(argv[2])))
    elif command == "init":
        out = asyncio.run(init(db))
    else:
        raise SystemExit(f"unknown command {command!r}")
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
