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

# Llama 3.1's template, tool parts as Meta ships them (system block shortened): tools in the first
# user message, a call rendered as the assistant message {"name": ..., "parameters": ...}, one
# call per message, results in ipython turns.
LLAMA3_SPECIALS = ("<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>")
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    '{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}'
    '{{- system_message }}{{- "<|eot_id|>" }}'
    "{%- if not tools is none %}"
    "{%- set first_user_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    '{{- "Given the following functions, please respond with a JSON for a function call " }}'
    '{{- "with its proper arguments that best answers the given prompt.\\n\\n" }}'
    '{{- \'Respond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.' }}"
    '{{- "Do not use variables.\\n\\n" }}'
    '{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}'
    '{{- first_user_message + "<|eot_id|>"}}'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}"
    "{%- if not message.tool_calls|length == 1 %}"
    '{{- raise_exception("This model only supports single tool-calls at once!") }}'
    "{%- endif %}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}"
    '{{- \'"parameters": \' }}{{- tool_call.arguments | tojson }}{{- "}" }}'
    '{{- "<|eot_id|>" }}'
    '{%- elif message.role == "tool" or message.role == "ipython" %}'
    '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}'
    "{%- if message.content is mapping or message.content is iterable %}"
    "{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}"
    '{{- "<|eot_id|>" }}'
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Mistral-7B-Instruct-v0.3's template, tool parts as Mistral ships them (the role-alternation
# check left out): tools before the last user turn, calls after the [TOOL_CALLS] control token
# with 9-character ids, results in [TOOL_RESULTS] blocks.
MISTRAL_SPECIALS = (
    "</s>",
    "<s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)
MISTRAL_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}'
    '{%- set system_message = messages[0]["content"] %}{%- set loop_messages = messages[1:] %}'
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}'
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    '{%- if message["role"] == "user" %}'
    "{%- if tools is not none and (message == user_messages[-1]) %}"
    '{{- "[AVAILABLE_TOOLS] [" }}'
    "{%- for tool in tools %}{%- set tool = tool.function %}"
    '{{- \'{"type": "function", "function": {\' }}'
    '{%- for key, val in tool.items() if key != "return" %}'
    "{%- if val is string %}{{- '\"' + key + '\": \"' + val + '\"' }}"
    "{%- else %}{{- '\"' + key + '\": ' + val|tojson }}{%- endif %}"
    '{%- if not loop.last %}{{- ", " }}{%- endif %}'
    "{%- endfor %}"
    '{{- "}}" }}'
    '{%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" }}{%- endif %}'
    "{%- endfor %}"
    '{{- "[/AVAILABLE_TOOLS]" }}'
    "{%- endif %}"
    "{%- if loop.last and system_message is defined %}"
    '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}'
    '{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}'
    "{%- elif message.tool_calls is defined and message.tool_calls is not none %}"
    '{{- "[TOOL_CALLS] [" }}'
    "{%- for tool_call in message.tool_calls %}"
    "{%- set out = tool_call.function|tojson %}{{- out[:-1] }}"
    "{%- if not tool_call.id is defined or tool_call.id|length != 9 %}"
    '{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}'
    "{%- endif %}"
    "{{- ', \"id\": \"' + tool_call.id + '\"}' }}"
    '{%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}'
    "{%- endfor %}"
    '{%- elif message["role"] == "assistant" %}'
    '{{- " " + message["content"]|trim + eos_token}}'
    '{%- elif message["role"] == "tool_results" or message["role"] == "tool" %}'
    "{%- if message.content is defined and message.content.content is defined %}"
    "{%- set content = message.content.content %}"
    "{%- else %}{%- set content = message.content %}{%- endif %}"
    '{{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}'
    "{%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}"
    '{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}'
    "{%- endif %}"
    "{{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}"
    "{%- else %}"
    '{{- raise_exception("Only user and assistant roles are supported!") }}'
    "{%- endif %}"
    "{%- endfor %}"
)

# family -> (chat template, special token names for ``tiny_models.make_byte_tokenizer``; the
# first is the EOS, the second the BOS where the family has one)
FAMILIES = {
    "hermes": (TOOLS_TEMPLATE, ()),
    "llama3": (LLAMA3_TEMPLATE, LLAMA3_SPECIALS),
    "mistral": (MISTRAL_TEMPLATE, MISTRAL_SPECIALS),
}


def family_tokenizer(family: str):  # noqa: ANN201
    """A byte tokenizer carrying ``family``'s chat template and control tokens."""
    import tiny_models

    template, specials = FAMILIES[family]
    tokenizer = tiny_models.make_byte_tokenizer(specials=specials)
    tokenizer.chat_template = template
    if len(specials) > 1:
        tokenizer.bos_token = specials[1]
    return tokenizer
