import pytest
import torch
import torch.nn.functional as F

from slit_lightning.model.llm import FrozenLLM, Generation, LLMConfigError

KINDS = ["opt", "llama", "t5"]


@pytest.fixture(params=KINDS)
def llm(request, tiny_llm_factory) -> FrozenLLM:
    return FrozenLLM.from_pretrained(str(tiny_llm_factory(request.param)))


def soft(llm: FrozenLLM, batch: int = 2, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, llm.width, generator=g)


def test_loaded_frozen_and_stays_in_eval(llm):
    assert llm.width == 32
    assert not any(p.requires_grad for p in llm.parameters())
    llm.train()
    assert not llm.model.training
    assert llm.is_encoder_decoder == (llm.model.config.model_type == "t5")


def test_loss_reaches_the_soft_prompt_and_only_it(llm):
    prompt = soft(llm).requires_grad_(True)
    loss = llm.loss(prompt, ["", "Question: how many?"], ["a low hum", "three"])
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.parameters())


def test_padding_does_not_change_the_loss(llm):
    """A batch's loss is the token-weighted mean of its rows' losses: padding adds nothing."""
    prompts, targets = ["", "a siren"], ["two knocks and a bell strike", "hum"]
    s = soft(llm)
    batch = llm.loss(s, prompts, targets)
    counts = [len(llm.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in targets]
    rows = [llm.loss(s[i : i + 1], prompts[i : i + 1], targets[i : i + 1]) for i in range(2)]
    expected = sum(r * c for r, c in zip(rows, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(batch, expected, rtol=1e-5, atol=1e-5)


def test_per_row_losses_equal_each_row_alone(llm):
    """Scoring candidates in one batch (generative classification) gives each row's own loss."""
    prompts, targets = ["", "a siren", "Question: what?"], ["two knocks", "hum", "a bell strike"]
    s = soft(llm, batch=3)
    rows = llm.loss(s, prompts, targets, per_row=True)
    alone = torch.stack([llm.loss(s[i : i + 1], prompts[i : i + 1], targets[i : i + 1])
                         for i in range(3)])  # fmt: skip
    assert rows.shape == (3,)
    torch.testing.assert_close(rows, alone, rtol=1e-5, atol=1e-5)
    assert len(set(rows.tolist())) == 3


def test_decoder_only_loss_covers_exactly_the_target_and_eos(tiny_llm_factory):
    llm = FrozenLLM.from_pretrained(str(tiny_llm_factory("llama")))
    s = soft(llm, batch=1)
    prompt_ids = llm.tokenizer("a siren")["input_ids"]  # BOS + tokens (this tokenizer adds BOS)
    assert prompt_ids[0] == llm.tokenizer.bos_token_id
    # the target as the LLM reads it in running text: joined to the prompt by a space
    joint = llm.tokenizer("a siren two knocks")["input_ids"]
    assert joint[: len(prompt_ids)] == prompt_ids
    target = [*joint[len(prompt_ids) :], llm.tokenizer.eos_token_id]
    alone = llm.tokenizer("two knocks", add_special_tokens=False)["input_ids"]
    assert target[:-1] != alone  # tokenized apart, "two" would lose its leading space
    ids = torch.tensor([prompt_ids + target])
    tokens = llm.model.get_input_embeddings()(ids)
    embeds = torch.cat([tokens[:, :1], s, tokens[:, 1:]], dim=1)  # BOS, soft prompt, the rest
    logits = llm.model(inputs_embeds=embeds).logits[0]
    start = s.shape[1] + len(prompt_ids)  # first target position
    manual = F.cross_entropy(logits[start - 1 : -1], torch.tensor(target))
    torch.testing.assert_close(llm.loss(s, ["a siren"], ["two knocks"]), manual)


def test_batched_generation_matches_one_row_at_a_time(llm):
    s = soft(llm, batch=3)
    prompts = ["", "Question: how many beeps are there? Answer:", "a"]
    settings = Generation(max_new_tokens=6, min_new_tokens=6)
    together = llm.generate(s, prompts, settings)
    alone = [llm.generate(s[i : i + 1], prompts[i : i + 1], settings)[0] for i in range(3)]
    assert together == alone
    assert all(isinstance(t, str) for t in together)


def test_generation_modes_and_length_limits(llm):
    s = soft(llm, batch=2)
    greedy = llm.generate(s, ["", ""], Generation(max_new_tokens=5))
    assert greedy == llm.generate(s, ["", ""], Generation(max_new_tokens=5))
    beams = llm.generate(s, ["", ""], Generation(max_new_tokens=5, num_beams=3))
    torch.manual_seed(0)
    sampled = llm.generate(s, ["", ""], Generation(max_new_tokens=5, do_sample=True, top_p=0.8))
    assert len(beams) == len(sampled) == 2
    for settings in (Generation(max_new_tokens=5), Generation(max_new_tokens=5, num_beams=3)):
        assert llm.generate_ids(s, ["", ""], settings).shape[1] <= 5
    longer = llm.generate_ids(s, ["", ""], Generation(max_new_tokens=7, min_new_tokens=7))
    assert longer.shape == (2, 7)
    penalised = llm.generate(s, ["", ""], Generation(max_new_tokens=8, repetition_penalty=2.0))
    assert len(penalised) == 2


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_a_learned_soft_prompt_makes_the_llm_say_the_target(tiny_llm_factory, kind):
    """Training only the soft prompt on the loss makes greedy generation produce the target:
    the loss and the generation path lay the sequence out the same way."""
    llm = FrozenLLM.from_pretrained(str(tiny_llm_factory(kind)))
    torch.manual_seed(0)
    prompt = torch.nn.Parameter(torch.randn(1, 8, llm.width))
    optimiser = torch.optim.Adam([prompt], lr=0.1)
    for _ in range(300):
        optimiser.zero_grad()
        loss = llm.loss(prompt, ["a"], ["a low hum"])
        loss.backward()
        optimiser.step()
    assert loss.item() < 1.0
    assert llm.generate(prompt.detach(), ["a"], Generation(max_new_tokens=12)) == ["a low hum"]


def test_errors_name_the_problem(tiny_llm_factory, tmp_path):
    llm = FrozenLLM.from_pretrained(str(tiny_llm_factory("opt")))
    with pytest.raises(ValueError, match=r"soft prompt must be \(B, N, 32\)"):
        llm.loss(torch.zeros(2, 3, 16), ["", ""], ["a", "b"])
    with pytest.raises(ValueError, match="2 soft prompts but 1 prompts"):
        llm.generate(torch.zeros(2, 3, 32), [""])
    with pytest.raises(LLMConfigError, match="slit bootstrap llm"):
        FrozenLLM.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(LLMConfigError, match="float64"):
        FrozenLLM.from_pretrained(str(tiny_llm_factory("opt")), dtype="float64")


def test_identity_is_the_weights_not_the_dtype(tiny_llm_factory):
    path = str(tiny_llm_factory("opt"))
    a = FrozenLLM.from_pretrained(path)
    b = FrozenLLM.from_pretrained(path, dtype="bfloat16")
    assert b.dtype == torch.bfloat16
    assert a.identity == b.identity
    assert a.identity != FrozenLLM.from_pretrained(str(tiny_llm_factory("llama"))).identity
    torch.manual_seed(1)  # same architecture, other weights: another identity
    other = type(a.model)(a.model.config)
    assert FrozenLLM(other, a.tokenizer).identity != a.identity
    loss = b.loss(soft(b), ["", ""], ["a", "b"])  # a float32 soft prompt into a bf16 model
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind, adds", [("llama", True), ("opt", False)])
def test_the_soft_prompt_follows_only_a_bos_the_tokenizer_added(tiny_llm_factory, kind, adds):
    """A BOS the tokenizer adds opens the document and the soft prompt goes after it; a BOS the
    text itself holds (SmolLM2's <|im_start|> opening a chat turn) is the prompt's own."""
    llm = FrozenLLM.from_pretrained(str(tiny_llm_factory(kind)))
    assert llm.adds_bos is adds
    bos = llm.tokenizer.bos_token
    rows = llm._ids([f"{bos} hello", "hello"], special=True)
    assert llm._bos_heads(rows) == ([1, 1] if adds else [0, 0])
