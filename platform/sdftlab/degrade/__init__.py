"""Degrade a model, then recover it: the operators behind `sdftlab degrade`.

The paper degrades Qwen2.5 and measures how well self-distillation fine-tuning recovers it.
Three operators, each reading one lineage state and writing a new one whose parent it is:

* `prune` — structured FFN pruning: remove the same fraction of SwiGLU neurons (gate row,
  up row, down column together) from every layer, ranked by weight magnitude or first-order
  Taylor importance; the result is a smaller model that `from_pretrained` and vLLM load
  as is (`sdftlab degrade prune --from expert --to pruned10 --ratio 0.1 --importance taylor`).
* `quantize` — NF4 4-bit quantization with bitsandbytes (double quantization, fp32 compute on
  CPU), reloadable by `from_pretrained`, plus the QLoRA wrapper that trains LoRA adapters on
  the frozen 4-bit base (`sdftlab degrade quantize --from expert --to nf4`).
* `sft` — multi-round supervised fine-tuning on Ray Train (the plain-SFT degradation and
  baseline).

Import the submodules directly (`from sdftlab.degrade.prune import prune_state`); this
package re-exports nothing, so importing it loads neither bitsandbytes nor peft.
"""
