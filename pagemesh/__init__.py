"""pagemesh: LLM serving with a paged KV cache and continuous batching, as microservices.

Offline use, with vLLM's names::

    from pagemesh import LLM, SamplingParams
    llm = LLM()  # the default model, SmolLM2-135M-Instruct
    print(llm.generate("The capital of France is", SamplingParams(temperature=0))[0].outputs[0].text)
"""

from pagemesh.outputs import CompletionOutput, Logprob, RequestOutput
from services.sampling_params import SamplingParams


def __getattr__(name: str):  # noqa: ANN202 - keep `import pagemesh` light: torch loads only with LLM
    if name == "LLM":
        from pagemesh.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
