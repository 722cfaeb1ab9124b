"""The PyTorch twin of textgpt2's GPT, for the benchmarks that compare the two in one run:
the same architecture (tied head over the padded vocabulary, pre-LN blocks, tanh GELU,
F.scaled_dot_product_attention causal), the same parameter names, and dropout at GPT-2's sites
when p_drop > 0 (nn.Identity otherwise, so p = 0 adds no kernels)."""


def load_our_weights(torch, model, state):
    """Copy textgpt2's parameters (name -> NumPy array) into the twin: the same names, except
    that our embedding tables are wte and wpe where the twin's are wte.weight and wpe.weight."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            ours = name[:-len(".weight")] if name in ("wte.weight", "wpe.weight") else name
            p.copy_(torch.from_numpy(state[ours]))


def adamw_groups(model, weight_decay):
    """nanoGPT's AdamW parameter groups: weight decay on the matrices and embeddings (dim >= 2),
    none on biases and layernorm parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_torch_gpt(torch, cfg, p_drop=0.0):
    """An nn.Module class instance for GPTConfig `cfg`; load textgpt2's weights into it with
    load_our_weights. forward(idx, targets) returns the mean cross-entropy."""
    nn, F = torch.nn, torch.nn.functional
    C, H = cfg.n_embd, cfg.n_head

    def dropout():
        return nn.Dropout(p_drop) if p_drop > 0 else nn.Identity()

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C)
            self.c_proj = nn.Linear(C, C)
            self.resid_dropout = dropout()

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=p_drop if self.training else 0.0)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(C, 4 * C)
            self.c_proj = nn.Linear(4 * C, C)
            self.dropout = dropout()

        def forward(self, x):
            return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(C), Attention()
            self.ln_2, self.mlp = nn.LayerNorm(C), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg.padded_vocab_size, C)
            self.wpe = nn.Embedding(cfg.block_size, C)
            self.drop = dropout()
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets, real_vocab_only=False):
            T = idx.shape[1]
            x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)     # tied head, (B, T, Vp)
            if real_vocab_only:
                logits = logits[..., :cfg.vocab_size]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return TorchGPT()


