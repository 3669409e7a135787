"""vtp: learned vision-token pruning for vision-language models, as a library and a course."""
from .gumbel import keep_probability, one_gumbel_sigmoid, relaxed_bernoulli, sample_keep_mask
from .losses import DualAscentController, PruningLoss
from .pruner import GumbelVisionPruner, PrunerOutput
from .schedules import get_temperature, sparsity_weight_schedule, target_ratio_schedule
from .attention import policy_attention, remove_tokens
from .vlm import PrunedVLM, build_llava
from .patch import patch, unpatch
from .evaluate import accuracy
from .train import (PrunerConfig, TrainConfig, load_or_train_teacher, pruner_config, pruner_recipe, train_pruner,
                    train_patched, train_teacher)
from .diagnose import diagnose
from .pretrained import load_pretrained_teacher
from .sweep import run_jobs, train_and_test
from .scenes import (SceneConfig, encode_scenes, generate_split, scene_accuracy, scene_processor, scene_split,
                     train_stream)
from .baselines import VisionZip, evidence_oracle, evidence_recall

__version__ = "0.1.0"

__all__ = [
    "sample_keep_mask",  # hard/soft keep mask from [drop, keep] logits via F.gumbel_softmax
    "keep_probability",  # softmax keep probability of [drop, keep] logits
    "relaxed_bernoulli",  # binary Concrete sample with Logistic noise
    "one_gumbel_sigmoid",  # the biased one-Gumbel "sigmoid" (a bug, kept for lessons)
    "GumbelVisionPruner",  # MLP scorer -> Gumbel mask in training, threshold / top-k in eval
    "PrunerOutput",  # (mask, logits, keep_prob) returned by the pruner
    "PruningLoss",  # CE on answers + KL distillation + visual-only sparsity
    "DualAscentController",  # Lagrangian controller holding the keep ratio at target
    "get_temperature",  # temperature schedule (exponential 5.0 -> 0.1 by default)
    "sparsity_weight_schedule",  # sparsity-weight warm-up
    "target_ratio_schedule",  # target keep-ratio curriculum 1.0 -> target
    "policy_attention",  # context: run a transformers model with the policy-weighted (DynamicViT) attention
    "remove_tokens",  # physical token removal keeping original position ids, right-padded
    "PrunedVLM",  # pruner between projector and LLM of any LlavaForConditionalGeneration
    "build_llava",  # small LlavaForConditionalGeneration from a preset ("smoke" / "full")
    "patch",  # prune a LLaVA / LLaVA-NeXT / Qwen2-VL model in place (knob model.vtp_ratio); generate() keeps working
    "unpatch",  # undo vtp.patch: the model's own methods back
    "accuracy",  # easy-VQA answer accuracy, overall and per question type, optionally pruned
    "TrainConfig",  # teacher training recipe (presets "smoke" / "full")
    "train_teacher",  # train the unpruned small LLaVA on easy-VQA
    "load_or_train_teacher",  # load the saved teacher, or train and save it
    "PrunerConfig",  # pruner training recipe (presets "smoke" / "full"; lesson-08 variants flip one field)
    "pruner_config",  # the pruner recipe for a mode, with overrides
    "pruner_recipe",  # lesson 07's recipe for one keep ratio (phase 1 + adaptation to top-k)
    "train_pruner",  # train a Gumbel pruner + student against a frozen teacher
    "train_patched",  # train a pruner for any family vtp.patch supports, through the patched model
    "diagnose",  # flag the symptoms of the usual pruning mistakes in a training history
    "load_pretrained_teacher",  # the shipped GPU-trained easy-VQA teacher, checksum verified
    "run_jobs",  # run independent jobs concurrently, one process each on a GPU machine
    "train_and_test",  # train one pruner from the teacher and test it with real removal
    "SceneConfig",  # CLEVR-style 2-D scenes at 576 tokens: objects, sizes, colours, clutter, question families
    "generate_split",  # balanced questions with evidence patches over seeded scenes
    "scene_split",  # the fixed scenes val / test (10,080 questions) / compositional split
    "train_stream",  # endless seeded scenes training data, chunk by chunk
    "scene_processor",  # VQAProcessor for scenes (576 image tokens, the templates' vocabulary)
    "encode_scenes",  # tokenize a scenes split into vtp.data's batch format
    "scene_accuracy",  # accuracy on scenes per question family; checks the model gives 576 tokens
    "VisionZip",  # VisionZip-style keep_fn: dominant tokens by [CLS] attention + merged contextual tokens
    "evidence_oracle",  # keep_fn keeping a question's evidence patches first (the selection upper bound)
    "evidence_recall",  # fraction of a question's evidence patches a keep mask contains
]
