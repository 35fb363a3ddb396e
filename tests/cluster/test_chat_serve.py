"""Chat prompts through the whole Ray Serve stack (issue 12 item 2): the `messages` field crosses
Serve's gRPC proxy, the coordinator replica renders it with every pool's own tokenizer, and bad
messages are INVALID_ARGUMENT there too.

The default stack's demo models have no chat template, so `own` falls back to the plain transcript
for every pool: a chat must decode exactly like that transcript sent as a plain prompt.
"""

from __future__ import annotations

import grpc
import pytest

from eft_serve.client import EftClient


def test_chat_through_serve_equals_its_plain_transcript(cluster_stack) -> None:
    family = cluster_stack["family"]
    with EftClient(cluster_stack["address"], timeout=120) as client:
        for q in family.world.held_out_questions()[:2]:
            kw = dict(temperature=0, max_new_tokens=16, logprob_top_k=0)
            chat = client.chat([{"role": "system", "content": "Answer."}, ("user", q.text)], **kw)
            plain = client.complete(f"System: Answer.\nUser: {q.text}\nAssistant:", **kw)
            assert list(chat.token_ids) == list(plain.token_ids) and len(chat.token_ids) > 0
            assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
        with pytest.raises(grpc.RpcError) as err:
            client.chat([("robot", "hi")], max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            client.complete("hi", messages=[("user", "hi")], max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
