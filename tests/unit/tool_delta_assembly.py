"""Streamed tool-call deltas put back together, as an OpenAI client does (for the tool tests)."""


def assemble(deltas: list[dict]) -> dict[int, dict]:
    """``{index: {"id", "name", "arguments"}}`` from chat-completion chunk deltas."""
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], {"id": c.get("id"), "name": "", "arguments": ""})
            entry["name"] += c["function"].get("name", "")
            entry["arguments"] += c["function"].get("arguments", "")
    return calls
