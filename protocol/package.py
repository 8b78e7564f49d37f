"""File names, tensor keys and tensor dtypes of an expert package (docs/expert-package.md)."""

# A standard PEFT LoRA adapter, loadable by `PeftModel.from_pretrained` unchanged.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Per-module router vectors keyed `<module path in the base model><suffix>`,
# e.g. `model.layers.0.self_attn.q_proj.gate`: float32, shape [in_features].
ROUTER_FILE = "router.safetensors"
GATE_SUFFIX = ".gate"
AVERAGE_ACTIVATION_SUFFIX = ".average_activation"
# The manifest (protocol.manifest.ExpertManifest) as JSON.
MANIFEST_FILE = "expert.json"
# Opt-in MiniLM embeddings of training inputs: one tensor [examples, dim], float32.
# They leak information about the private data; the client warns before writing them.
RETRIEVAL_FILE = "retrieval.safetensors"
RETRIEVAL_EMBEDDINGS_KEY = "embeddings"
# all-MiniLM-L6-v2 vectors of up to 1000 training inputs (METHOD.md, Retrieval); the
# admission limits default to these.
RETRIEVAL_EMBEDDING_DIM = 384
MAX_RETRIEVAL_EXAMPLES = 1000

# Tensor dtypes, as safetensors names them. LoRA weights may be half precision, but not
# bfloat16: numpy, which the validator reads with, has no such type. Router vectors and
# retrieval embeddings are float32.
LORA_DTYPES = ("F32", "F16")
VECTOR_DTYPE = "F32"

REQUIRED_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ROUTER_FILE, MANIFEST_FILE)
OPTIONAL_FILES = (RETRIEVAL_FILE,)
PACKAGE_FILES = REQUIRED_FILES + OPTIONAL_FILES
