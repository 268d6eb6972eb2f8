"""A small tools-capable chat template (Qwen2.5's shape) for tiny test models' byte tokenizer:
``<|reserved_0|>`` opens a turn, ``<|endoftext|>`` (the EOS) closes it."""

TOOLS_TEMPLATE = (
    "{%- if tools %}<|reserved_0|>system\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools><|endoftext|>{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|reserved_0|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|endoftext|>"
    "{%- elif m.tool_calls %}<|reserved_0|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}<|endoftext|>"
    "{%- else %}<|reserved_0|>{{ m.role }}\n{{ m.content }}<|endoftext|>{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|reserved_0|>assistant\n{% endif %}"
)
