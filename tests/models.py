"""Small real LangChain models for shapes the stock fakes cannot produce.

They are ordinary `BaseChatModel` / `BaseLLM` subclasses, run through LangChain's own
invoke/stream machinery and callbacks; only what the provider would send is scripted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    LLMResult,
)
from pydantic import Field, SecretStr


class ScriptedChatModel(BaseChatModel):
    """Answers with `message` (plus `generation_info`); streams `chunks` when given."""

    message: AIMessage = AIMessage(content="")
    generation_info: dict[str, Any] | None = None
    chunks: list[AIMessageChunk] = Field(default_factory=list)
    model: str = "scripted-1"
    temperature: float = 0.0
    api_key: SecretStr = SecretStr("sk-scripted-secret-0000")

    @property
    def _llm_type(self) -> str:
        return "scripted-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "temperature": self.temperature, "api_key": self.api_key}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(
            generations=[ChatGeneration(message=self.message, generation_info=self.generation_info)]
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self.chunks:
            if run_manager is not None:
                run_manager.on_llm_new_token(
                    str(chunk.content), chunk=ChatGenerationChunk(message=chunk)
                )
            yield ChatGenerationChunk(message=chunk)


class UsageLLM(BaseLLM):
    """A completion model whose provider reports usage in `llm_output` (OpenAI style)."""

    text: str = "completion"
    llm_output: dict[str, Any] = Field(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "usage-llm"

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return LLMResult(
            generations=[[Generation(text=self.text)] for _ in prompts], llm_output=self.llm_output
        )


class ProviderChatModel(GenericFakeChatModel):
    """LangChain's fake chat model reporting a provider's model, as ChatOpenAI,
    ChatAnthropic or ChatGoogleGenerativeAI do: `ls_provider` and `ls_model_name` in its
    LangSmith params (the run's metadata), the model name in the answer's
    `response_metadata`, the counts in its `usage_metadata` (`answer`)."""

    provider: str
    model: str

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"], params["ls_model_name"] = self.provider, self.model
        return params

    @classmethod
    def answer(
        cls, provider: str, model: str, text: str, usage: dict[str, Any]
    ) -> ProviderChatModel:
        message = AIMessage(text, usage_metadata=usage,  # type: ignore[arg-type]
                            response_metadata={"model_name": model})  # fmt: skip
        return cls(provider=provider, model=model, messages=iter([message]))
