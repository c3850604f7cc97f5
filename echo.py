"""Echo: pitch-aware speech recognition in one file. An encoder-decoder transformer (log-mel in, characters out) whose encoder
attention can know about the speaker's pitch (f0). Read top to bottom: config -> data and features -> model -> optimizer ->
decoding and evaluation -> diagnostics -> training -> experiments -> CLI. The README states the method; test_echo.py proves it.

    python echo.py                      # build the embedded corpus, train, decode the test split
    python echo.py --transcribe a.wav --ckpt runs/<name>/ckpt.pt
"""
import argparse, collections, concurrent.futures, contextlib, csv, ctypes, dataclasses, functools, hashlib, inspect, io
import itertools, json, math, multiprocessing.connection, operator, os, platform, random, re, shutil, signal, socket
import string, subprocess, sys, threading, time, zlib
from pathlib import Path

import datasets, espeakng_loader, jiwer, librosa, matplotlib, pypinyin, scipy.stats, soundfile, torch, torchaudio, wordfreq
import numpy as np, torch.nn as nn, torch.nn.functional as F
from datasets.distributed import split_dataset_by_node
from pypinyin.contrib.tone_convert import to_normal
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

matplotlib.use("Agg")  # figures are rendered to arrays and files, never to a screen
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention plans every new batch shape, ~17 ms a call (README, GPUs)

# ---- config: every tunable constant, the model's dimensions, the flags
SAMPLE_RATE = 16000  # Hz of all audio inside Echo; files at other rates are resampled when read
HOP = 160  # 10 ms frames: frame k of the log-mel and of the f0 track is centred at k * 10 ms
N_MELS = 80  # log-mel bins over 0-8 kHz, as Whisper
PAD, BOS, EOS = 0, 1, 2  # special token ids; PAD doubles as the CTC blank
STREAMS = ("spectrogram", "spectrogram,pitch", "spectrogram,waveform", "spectrogram,pitch,waveform")  # --streams
SPLITS = ("train", "validation", "test", "test_unseen", "test_open")  # test_unseen: new voices; test_open: new words
TEST_SPLITS = SPLITS[2:]  # decoded and reported at the end of every run
ZIPF_POWER = 0.6  # the corpus draws words with p ~ frequency^0.6: Zipf-like, and flat enough that 20,000+ words occur
OPEN_SHARE = 0.1  # share of the words below the 1,000 most frequent that only test_open's sentences use
SILENCE_PEAK = 1e-4  # a waveform whose peak is below this (-80 dBFS) is silent
F0_MIN, F0_MAX = 60.0, 500.0  # Hz searched by the pitch tracker; the embedded voices span about 60-500 Hz
YIN_DIP, YIN_VOICED = 0.15, 0.5  # YIN's threshold for the period's dip, and the dip depth below which a frame is voiced
SILENCE_DB = -45.0  # frames this far below the utterance's loudest are unvoiced, whatever YIN says
SPIKE_OCTAVES, MIN_RUN = 0.3, 3  # f0 this far from its run's 9-frame median is a spike; voiced runs are >= 30 ms
F0_REF = 220.0  # Hz at which the pitch-warped rotary advances exactly one position per frame
SPEED_RANGE = (0.25, 3.0)  # clamp of f0 / F0_REF (55-660 Hz): with max step 1 rad/frame no step exceeds pi
RADIUS_MAX = 2.0  # variable radii stay in [1 / RADIUS_MAX, RADIUS_MAX]
RADIUS_INIT = 0.1  # initial per-head radius strength: radii start near 1, so --radii starts as plain rotary
PITCH_BIAS_INIT = -2.0  # initial per-head pitch-bias parameter: softplus(-2) = 0.13 logit per octave, a gentle start
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.98), 1e-9  # the transformer recipe (Vaswani et al.): faster-adapting second moments
LEARNING_RATES = {"adamw": 3e-3, "muon": 3e-3, "maxfactor": 1.5e-3, "adafactor": 1e-2}  # peak (README, Optimizers)
BUCKET_WINDOW = 1000  # utterances shuffled, then sorted by length together: batches with little padding, random order
EVAL_BATCH_FRAMES = 10000  # padded 10 ms frames per decoding batch (evaluation, --transcribe): on CPU 15 % faster than 30000
SPECAUG_MASKS = (2, 27, 5, 0.05)  # ESPnet's LibriSpeech-100 SpecAugment: 2 masks <= 27 mel bins, 5 <= 5 % of the time
SPEED_FACTORS = (0.9, 1.0, 1.1)  # Kaldi's speed perturbation factors (tempo and pitch together)
REVERB_RT60 = (0.1, 0.5)  # s: --reverb's rooms, from a small office to a classroom
BANDPASS_HZ = ((50, 400), (2500, 7500))  # --bandpass: ranges of the high-pass and the low-pass cut-off
VTLP_WARP = 0.1  # --vtlp: frequencies scaled by 1 +- this at most (Jaitly & Hinton's VTLP: 0.9-1.1)
TEMPO_WARP = 0.2  # --tempo: speech made up to this much faster or slower, its pitch kept (README, Augmentation)
CANDIDATES = 8  # tokens each hypothesis is extended by per decoding step, before the beam keeps the best
LM_ORDER = 8  # order of the character n-gram that decoding adds (README, Evaluation is decoded): 7 tokens of context
END_MARGIN = 10.0  # beam search drops an utterance's live hypotheses this far below its best ended one
MAX_CHARS_PER_SECOND = 30  # decoding length cap (speech rarely exceeds 20 characters per second), plus 10
BUDGET_AT, BUDGET_SLOWDOWN, BUDGET_RESERVE = 150, 1.15, 300  # --time_budget: set at step 150 (README, Time budget)
SOURCE = Path(__file__).read_bytes()  # the exact code this process runs: saved with every run and checkpoint
CODE_HASH = hashlib.sha256(SOURCE).hexdigest()[:10]

AUGMENT_ON = dict(specaug=True, speed_perturb=True, noise_snr=(10.0, 30.0), reverb=True, bandpass=True, vtlp=True, tempo=True)
AUGMENT_OFF = {name: None if name == "noise_snr" else False for name in AUGMENT_ON}
BEFORE_FLAGS = dict(momentum=0.0, vtlp=False, tempo=False, sortagrad=False, ema=0.0, lr_floor=0.1, time_budget=0)  # --ablate
PITCH = {"baseline": dict(f0_theta=False), "pitch_stream": dict(f0_theta=False, streams="spectrogram,pitch"),
         "f0_theta": dict(f0_theta=True), "+radii": dict(f0_theta=True, radii=True),  # pitch_stream: f0 as an input
         "+pitch_bias": dict(f0_theta=True, pitch_bias=True), "+zero_value": dict(f0_theta=True, zero_value=True),
         "all": dict(f0_theta=True, radii=True, pitch_bias=True, zero_value=True)}
STUDY_MODEL = dict(optimizer="maxfactor", conv=0, dec_layers=2, lm_weight=0.0, beam=4, max_steps=2200, lr=3e-3, lr_floor=0.1,
                   momentum=0.0, vtlp=False, tempo=False, sortagrad=False, ema=0.0, weight_decay=0.01, batch_frames=4000,
                   warmup=200, mlp=4)  # as measured
STUDY = {  # --ablate study: the tonal positive control first, then English (README, Pitch study)
    "mandarin": (STUDY_MODEL | dict(dataset="embedded-mandarin", corpus_size=2000, batch_frames=2000, max_steps=1200,
                                    eval_every=300), tuple(PITCH)),
    "english": (STUDY_MODEL | dict(dataset="embedded", test_utts=200), "baseline f0_theta all pitch_stream".split())}
STUDY_RUNS = {f"{corpus}/{label}": budget | PITCH[label] for corpus, (budget, labels) in STUDY.items() for label in labels}
ABLATIONS = {"pitch": PITCH,  # --ablate: each configuration is a set of flag overrides
    "study": STUDY_RUNS, **{f"study-{c}": {k: v for k, v in STUDY_RUNS.items() if k.startswith(c)} for c in STUDY},
    "augment": {"none": AUGMENT_OFF} | {name: AUGMENT_OFF | {name: on} for name, on in AUGMENT_ON.items()},
    "optimizer": {name: dict(optimizer=name, lr=lr) for name, lr in LEARNING_RATES.items()}}

def snr_range(value):
    low, high = map(float, value.split(","))  # else a ValueError, which argparse reports as an invalid value
    if low > high:
        raise argparse.ArgumentTypeError(f"{value!r}: LOW is above HIGH")
    return low, high

def flag(default, help, **argparse_options):
    """A ModelConfig field that is also the command-line flag of the same name."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})

@dataclasses.dataclass
class ModelConfig:
    """The model's shape (whisper's ModelDimensions), from its flags; checkpoints store it to rebuild without argparse."""
    vocab: int  # characters of the tokenizer + PAD, BOS, EOS: from the training text, not a flag
    d_model: int = flag(192, "model width")
    n_heads: int = flag(4, "attention heads")
    enc_layers: int = flag(6, "encoder blocks")
    dec_layers: int = flag(1, "decoder blocks")
    mlp: int = flag(2, "width of each block's MLP, in multiples of d_model")
    ctc_weight: float = flag(0.5, "weight of the auxiliary CTC loss on the encoder (0 = no CTC head)")
    gate: str = flag("t", "gate on every block's MLP output (README)", choices=("none", "mlp", "t", "m"))
    gate_memory: int = flag(64, "memory slots of --gate m")
    conv: int = flag(7, "kernel (40 ms frames, odd) of a depthwise convolution in each encoder block; 0 = none")
    streams: str = flag("spectrogram", "streams fused by the c_gate", choices=STREAMS, metavar="spectrogram[,pitch][,waveform]")
    f0_theta: bool = flag(True, "pitch-warped rotary phase (f0 / 220 Hz per frame); --no-f0_theta = plain RoPE")
    radii: bool = flag(False, "rotary magnitude r from the utterance's log-f0 z-score, r in [1/2, 2]")
    pitch_bias: bool = flag(False, "attention logit bias -lambda_h * |octaves between voiced frames|")
    zero_value: bool = flag(False, "learnable per-head logit offset for unvoiced/silent keys")
    rope_freqs: str = flag("standard", "rotary frequency table", choices=("standard", "mel"))

    @classmethod
    def from_args(cls, args, vocab):
        return cls(vocab, **{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name != "vocab"})

def build_parser():
    formatter = type("Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    a = (p := argparse.ArgumentParser(description=__doc__, formatter_class=formatter)).add_argument
    a("--name", default=None, help="run name: logs and checkpoint go to runs/<name>/ (default: a timestamp)")
    a("--runs_dir", default="runs", help="parent folder of all runs")
    a("--seed", type=int, default=0, help="seed for initialisation and data order")
    a("--dataset", default="embedded", help="embedded (eSpeak's English), embedded-mandarin (pinyin with tones), a "
      "folder (README, Data) or a hub dataset id")
    a("--dataset_config", default=None, help="hub dataset config, e.g. clean (LibriSpeech) or en_us (FLEURS)")
    a("--splits", default="train,validation,test", help="train,validation,test split names of the dataset")
    a("--cache_dir", default=os.path.expanduser("~/.cache/echo"), help="corpus and feature cache")
    a("--corpus_size", type=int, default=8000, help="embedded corpus utterances, test_unseen's and test_open's 5 %% not included")
    a("--corpus_seed", type=int, default=0, help="seed of the embedded corpus (and of a flat folder's split)")
    a("--max_seconds", type=float, default=30.0, help="longer training audio is skipped, longer --transcribe audio cut")
    a("--streaming", action="store_true", help="read the train split as a stream, featurised on the fly by --workers")
    a("--num_proc", type=int, default=2, help="processes for corpus synthesis and feature extraction")
    a("--specaug", action="store_true", help="SpecAugment: 2 frequency masks <= 27 bins, 5 time masks <= 5 %% each")
    a("--speed_perturb", action="store_true", help="resample each utterance by 0.9, 1.0 or 1.1 (tempo and pitch)")
    a("--noise_snr", type=snr_range, default=None, metavar="LOW,HIGH", help="white noise at a random SNR in dB")
    a("--reverb", action="store_true", help="reverberation of a random synthetic room (RT60 0.1-0.5 s)")
    a("--bandpass", action="store_true", help="random band limits: high-pass at 50-400 Hz, low-pass at 2.5-7.5 kHz")
    a("--vtlp", action=argparse.BooleanOptionalAction, default=True, help="training log-mel read at f / a, a in 0.9-1.1 (VTLP)")
    a("--tempo", action=argparse.BooleanOptionalAction, default=True, help="training frames resampled to n / a, a in 0.8-1.2")
    a("--sortagrad", action=argparse.BooleanOptionalAction, default=True, help="epoch 0's batches shortest first (SortaGrad)")
    for f in dataclasses.fields(ModelConfig)[1:]:  # the model's flags
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        a(f"--{f.name}", default=f.default, **(kind | dict(f.metadata)))
    a("--decode_ctc_weight", type=float, default=0.5, help="weight of CTC prefix scores in decoding (0 = attention only)")
    a("--lm_weight", type=float, default=0.3, help="weight of the character 8-gram in decoding (0 = off; README)")
    a("--lm_sentences", type=int, default=100000, help="the embedded corpus's text-only sentences the n-gram also reads (README)")
    a("--beam", type=int, default=16, help="beam width of decoding (1 = greedy); hypotheses compete by score per token")
    a("--max_steps", type=int, default=4200, help="optimizer steps (fewer where --time_budget cuts them)")
    a("--time_budget", type=float, default=None, help="minutes a run aims at: at step 150 it keeps the steps that fit; a "
      "resumed run keeps its checkpoint's (default: 14 on the embedded corpora, else 0 = off; README, Time budget)")
    a("--batch_frames", type=int, default=4000, help="padded 10 ms frames per batch (length-bucketed)")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--optimizer", choices=tuple(LEARNING_RATES), default="muon", help="Muon (attention and MLP matrices) with MaxFactor (the "
      "rest), AdamW, MaxFactor, Adafactor")
    a("--lr", type=float, default=None, help="peak learning rate (default: LEARNING_RATES[--optimizer])")
    a("--momentum", type=float, default=0.9, help="MaxFactor's Nesterov momentum: its EMA's weight (0 = none, factored state)")
    a("--warmup", type=int, default=200, help="linear warmup steps, then cosine decay to lr * --lr_floor")
    a("--lr_floor", type=float, default=0.3, help="the fraction of the peak lr that the cosine decay ends at (README)")
    a("--weight_decay", type=float, default=0.1, help="decoupled weight decay (of matrices)")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this")
    a("--ema", type=float, default=0.99, help="evaluation decodes the weights' moving average: its decay a step (0: the weights)")
    a("--eval_every", type=int, default=1000, help="steps between validation decoding (greedy) and checkpoints")
    a("--eval_utts", type=int, default=100, help="validation utterances decoded at each evaluation")
    a("--test_utts", type=int, default=None, help="utterances decoded per test split at the end (default: all)")
    a("--log_every", type=int, default=50, help="steps between progress lines when stdout is not a terminal")
    a("--device", default="auto", help="auto, cpu or cuda")
    a("--compile", action="store_true", help="torch.compile the model (dynamic shapes)")
    a("--workers", type=int, default=None, help="DataLoader processes for batches (default 4 with CUDA, 0 on CPU)")
    a("--resume", action="store_true", help="continue runs/<name>/ckpt.pt")
    a("--bench", action="store_true", help="print the speed of train steps, f0 and decoding on this device, then exit")
    a("--ablate", nargs="?", const="pitch", choices=tuple(ABLATIONS), help="train an ablation (ABLATIONS); resumable")
    a("--seeds", type=int, default=3, help="seeds per configuration for --ablate")
    a("--jobs", type=int, default=1, help="--ablate's runs trained at a time, as processes sharing the threads")
    a("--diag_every", type=int, default=100, help="steps between per-block diagnostic scalars (0 = off)")
    a("--diagnose", nargs=2, metavar=("CKPT", "AUDIO"), help="write diagnostic figures to runs/<name>/ and exit")
    a("--transcribe", nargs="+", metavar="AUDIO", help="print '<path>\\t<transcript>' for each file and exit")
    a("--ckpt", default=None, help="checkpoint for --transcribe (and --bench's decoding rows)")
    return p

def parse_args(argv=None):
    args = (p := build_parser()).parse_args(argv)
    for flag in ("max_steps batch_frames grad_accum eval_every eval_utts test_utts corpus_size d_model n_heads beam "
                 "log_every jobs mlp").split():
        if (value := getattr(args, flag)) is not None and value <= 0:
            p.error(f"--{flag} must be positive, got {value}")
    args.time_budget = (14.0 if args.dataset in CORPORA else 0.0) if args.time_budget is None else args.time_budget
    if min(args.diag_every, args.lm_sentences, args.ema, args.lr_floor, args.time_budget) < 0 or args.ema >= 1:
        p.error(f"--diag_every {args.diag_every}, --lm_sentences {args.lm_sentences}, --lr_floor {args.lr_floor}, "
                f"--time_budget {args.time_budget}: 0 or more; --ema {args.ema}: in [0, 1)")
    if args.grad_accum % (world := int(os.environ.get("WORLD_SIZE", "1"))):
        p.error(f"--grad_accum {args.grad_accum} must be a multiple of the {world} processes")
    if not args.f0_theta and (on := [f for f in ("radii", "pitch_bias", "zero_value") if getattr(args, f)]):
        p.error(f"--{on[0]} uses the f0 track, which --no-f0_theta disables")
    if args.conv < 0 or (args.conv > 0 and args.conv % 2 == 0):
        p.error(f"--conv {args.conv} must be odd (a centred kernel), or 0 for none")
    if args.d_model % (2 * args.n_heads):
        p.error(f"--d_model {args.d_model} must be divisible by 2 * --n_heads")
    for path in (args.ckpt, args.diagnose and args.diagnose[0]):
        if path and not os.path.isfile(path):
            p.error(f"{path}: no such checkpoint")
    for flag, needs in (("transcribe", "ckpt"), ("resume", "name")):  # --resume: the --name of the run to continue
        if getattr(args, flag) and not getattr(args, needs):
            p.error(f"--{flag} needs --{needs}")
    if args.dataset not in CORPORA and os.path.isdir(args.dataset) and not list(Path(args.dataset).rglob("metadata.csv")):
        p.error(f"--dataset {args.dataset}: folder has no metadata.csv (file_name,transcription)")
    args.name = args.name or time.strftime("%Y%m%d-%H%M%S")
    if not (args.resume or args.transcribe or args.bench or args.ablate or args.diagnose) and (
            Path(args.runs_dir) / args.name).exists():
        p.error(f"{Path(args.runs_dir) / args.name} exists: add --resume to continue that run, or pick another --name")
    args.lr = args.lr or LEARNING_RATES[args.optimizer]
    return args

def pick_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)

# ---- data: text, embedded corpus, audio and features (log-mel and f0, aligned 1:1)
class BadInput(Exception):
    """An utterance that cannot be used; the message names the problem (callers add the file)."""
def normalize_text(text):
    """One normalisation for training targets and for WER/CER: lower case, letters, digits, apostrophes."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())

class Tokenizer:
    """Characters of the training text; ids 0..2 are PAD (and CTC blank), BOS, EOS."""
    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.index = {c: i + 3 for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars) + 3

    def encode(self, text):
        if unknown := set(text) - set(self.index):
            raise BadInput(f"characters outside the tokenizer: {''.join(sorted(unknown))!r}")
        return [self.index[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i - 3] for i in ids if i >= 3)

    def known(self, text):
        """text without the characters the tokenizer cannot encode (for teacher-forced scoring of held-out text)."""
        return "".join(c for c in str(text) if c in self.index)

# The embedded corpora (README, Data): English words or pinyin syllables spoken by eSpeak NG's voices and variants.
ESPEAK_DATA = Path(espeakng_loader.get_data_path())
ACCENTS = sorted(p.name.lower() for p in (ESPEAK_DATA / "lang" / "gmw").glob("en*"))  # eSpeak NG 1.52: 9 accents
VARIANTS = sorted(p.name for p in (ESPEAK_DATA / "voices" / "!v").iterdir())  # eSpeak NG 1.52: 104 voice variants
DROPPED_VARIANTS = ()  # variants that make speech unintelligible: none (README, Data)
UNSEEN_ACCENTS = ("en-029", "en-us-nyc")  # test_unseen speaks only these, with these variants, in these bands
UNSEEN_VARIANTS = tuple("Annie Denis Lee aunty f5 grandpa iven2 klatt3 m7 robosoft3 steph2 travis".split())
SETTINGS = {"pitch": (10, 90), "range": (5, 95), "rate": (90, 210)}  # eSpeak's parameters (rate: wpm), uniform
UNSEEN_SETTINGS = {"pitch": ((2, 9), (91, 98)), "range": ((5, 95),), "rate": ((80, 89), (211, 230))}
MANDARIN = "cmn-latn-pinyin"  # reads pinyin with tone digits; the plain cmn voice reads Latin letters as English
TONE_RANGE = (60, 95)  # Mandarin's pitch range: below about 60 eSpeak's four tone contours shrink towards each other

@functools.cache
def english_words():
    """wordfreq's top 50,000 English words that are a-z (at most one apostrophe) with a vowel, and their frequencies."""
    words = [w for w in wordfreq.top_n_list("en", 50000) if re.fullmatch(r"[a-z]+('[a-z]+)?", w) and re.search("[aeiouy]", w)]
    return words, [wordfreq.word_frequency(w, "en") for w in words]

@functools.cache
def pinyin_syllables():
    """pypinyin's toneless syllables that hold a vowel (ü as v; not m, n, ng, hm, hng), sorted: 420, each weight 1."""
    readings = (p for value in pypinyin.pinyin_dict.pinyin_dict.values() for p in value.split(","))
    syllables = sorted({s for s in map(to_normal, readings) if re.search("[aeiouv]", s)})
    return syllables, [1.0] * len(syllables)

def pinyin_tones(syllables, rng):
    """A tone 1-5 drawn independently for each syllable, written as eSpeak speaks it: a tone 3 before a tone 3 is
    said as tone 2 (third-tone sandhi), so the transcript holds the tone the audio carries."""
    tones = [rng.randint(1, 5) for _ in syllables]
    return [f"{s}{2 if t == next_t == 3 else t}" for s, t, next_t in zip(syllables, tones, tones[1:] + [0])]

CORPORA = {  # --dataset: the words, sentence lengths, accents and settings of each embedded corpus (README, Data)
    "embedded": dict(words=english_words, lengths=(4, 12), common=1000, accents=ACCENTS, unseen_accents=UNSEEN_ACCENTS,
                     settings=SETTINGS, unseen_settings=UNSEEN_SETTINGS),
    "embedded-mandarin": dict(words=pinyin_syllables, lengths=(3, 8), common=0, accents=(MANDARIN,),
                              unseen_accents=(MANDARIN,), settings=SETTINGS | {"range": TONE_RANGE},
                              unseen_settings=UNSEEN_SETTINGS | {"range": (TONE_RANGE,)})}

def corpus_plan(size, seed, corpus="embedded", text_only=0):
    """The utterances of CORPORA[corpus] (split, text, voice), deterministic: sentences of 4-12 words (3-8 syllables)
    drawn with p ~ frequency^ZIPF_POWER, never in two splits; OPEN_SHARE of the words past the `common` most frequent
    only in test_open, whose sentences are at least half such words; unseen accents, variants, pitch and rate bands only
    in test_unseen; random Mandarin tones. text_only > 0: instead, up to that many more train-like sentences, in no split."""
    rng, held_out, recipe = random.Random(seed), max(2, size // 20), CORPORA[corpus]
    words, freqs = recipe["words"]()
    open_words = set(rng.sample(words[recipe["common"]:], int(OPEN_SHARE * len(words[recipe["common"]:]))))
    pools = {is_open: [i for i, w in enumerate(words) if (w in open_words) == is_open] for is_open in (False, True)}
    weights = {k: list(itertools.accumulate(freqs[i] ** ZIPF_POWER for i in pool)) for k, pool in pools.items()}
    draw = lambda is_open, k: [words[i] for i in rng.choices(pools[is_open], cum_weights=weights[is_open], k=k)]
    def sentence(split):
        n = rng.randint(*recipe["lengths"])
        n_open = rng.randint((n + 1) // 2, n) if split == "test_open" else 0
        tokens = draw(True, n_open) + draw(False, n - n_open)
        rng.shuffle(tokens)
        return " ".join(pinyin_tones(tokens, rng) if corpus == "embedded-mandarin" else tokens)
    accents = {False: [a for a in recipe["accents"] if a not in UNSEEN_ACCENTS], True: recipe["unseen_accents"]}
    variants = {False: [v for v in VARIANTS if v not in UNSEEN_VARIANTS + DROPPED_VARIANTS], True: UNSEEN_VARIANTS}
    bands = {False: {k: (band,) for k, band in recipe["settings"].items()}, True: recipe["unseen_settings"]}
    counts, seen, plan = {"train": size - 2 * held_out} | {split: held_out for split in SPLITS[1:]}, set(), []
    for split in SPLITS:
        unseen = split == "test_unseen"
        for i in range(counts[split]):
            while (text := sentence(split)) in seen:  # a sentence in two splits would leak the test set
                pass
            seen.add(text)
            voice = f"{rng.choice(accents[unseen])}+{rng.choice(variants[unseen])}"
            settings = {key: rng.randint(*rng.choice(choices)) for key, choices in bands[unseen].items()}
            plan.append(dict(split=split, file_name=f"{split}/{i:05d}.flac", transcription=text, voice=voice, **settings))
    return [t for t in (sentence("train") for _ in range(text_only)) if t not in seen] if text_only else plan  # after it

def synthesize_chunk(job):
    """Speak a list of utterances in a fresh process: eSpeak's jitter state is deterministic only from
    process start, so each chunk is always spoken by a new process in the same order. Each file name is appended to
    the log before it is spoken (and again, marked, if eSpeak refused it or left it silent), so that build_corpus
    can name the utterance of a crash. Returns the refused or silent utterances, as (file_name, voice)."""
    (root, items, log), lib = job, ctypes.CDLL(espeakng_loader.get_library_path())
    torch.set_num_threads(1)  # one process per core
    native_rate, chunks, failed = lib.espeak_Initialize(0x02, 0, str(ESPEAK_DATA).encode(), 0), [], []  # synchronous
    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)(
        lambda wav, n, events: chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy()) or 0 if n > 0 else 0)
    lib.espeak_SetSynthCallback(callback)
    resample, libc, progress = torchaudio.transforms.Resample(native_rate, SAMPLE_RATE), ctypes.CDLL(None), open(log, "a")
    for number, item in enumerate(items):
        print(item["file_name"], file=progress, flush=True)
        chunks.clear()
        lib.espeak_ng_SetRandSeed(ctypes.c_long(number))  # breathy voices draw noise from both generators
        libc.srand(number)
        if lib.espeak_SetVoiceByName(item["voice"].encode()) == 0:
            for parameter, key in ((1, "rate"), (3, "pitch"), (4, "range")):
                lib.espeak_SetParameter(parameter, item[key], 0)
            text = item["transcription"].encode()
            lib.espeak_Synth(text, len(text) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, espeakCHARS_UTF8
            lib.espeak_Synchronize()
        wave = np.concatenate(chunks or [np.zeros(0, np.int16)]).astype(np.float32) / 32768
        if np.abs(wave).max(initial=0) < SILENCE_PEAK:
            failed.append((item["file_name"], item["voice"]))
            print(item["file_name"], "silent", file=progress, flush=True)
            continue
        soundfile.write(os.path.join(root, item["file_name"]), resample(torch.from_numpy(wave)).numpy(), SAMPLE_RATE,
                        subtype="PCM_16")
    return failed

def build_corpus(cache_dir, size, seed, num_proc=2, corpus="embedded"):
    """Synthesise an embedded corpus once -> cache_dir/corpus[-mandarin]-<size>-<seed>-<recipe>, <recipe> a hash of the
    plan and the synthesis code (README, Data: written as '.partial', CRC-checked on reuse, bad voices skipped)."""
    plan = corpus_plan(size, seed, corpus)
    recipe = hashlib.sha256(json.dumps([plan, inspect.getsource(synthesize_chunk)]).encode()).hexdigest()[:8]
    root = Path(cache_dir, f"{corpus.replace('embedded', 'corpus')}-{size}-{seed}-{recipe}")
    crc = lambda path: zlib.crc32(path.read_bytes())
    if (root / "done").exists():
        files = json.loads((root / "done").read_text()).get("crc32", {})
        damaged = [f for f, c in files.items() if not (root / f).is_file() or crc(root / f) != c]
        if files and not damaged:
            return str(root)
        print(f"echo: warning: {root}: damaged corpus cache ({damaged[0] if damaged else 'no checksums'}); rebuilding",
              file=sys.stderr)
    partial, t0 = root.with_name(root.name + ".partial"), time.time()
    for folder in (root, partial):
        shutil.rmtree(folder, ignore_errors=True)
    for split in SPLITS:
        (partial / split).mkdir(parents=True)
    # each chunk in a fresh process, forked from a server that imported this module once (a spawn imports it again: 5 s);
    # eSpeak segfaults on a few rare Mandarin utterances: that one is skipped and the rest of its chunk spoken anew
    queue, running, failed, logs = [plan[i:i + 1000] for i in range(0, len(plan), 1000)], {}, set(), itertools.count()
    (context := multiprocessing.get_context("forkserver")).set_forkserver_preload([__name__])
    while queue or running:
        while queue and len(running) < max(1, num_proc):
            items, log = queue.pop(0), partial / f"job{next(logs)}.log"
            (process := context.Process(target=synthesize_chunk, args=((partial, items, log),))).start()
            running[process] = items, log
        multiprocessing.connection.wait([process.sentinel for process in running])
        for process in [process for process in running if process.exitcode is not None]:
            items, log = running.pop(process)
            lines = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
            log.unlink(missing_ok=True)
            failed |= {line[0] for line in lines if len(line) > 1}  # refused or silent
            started = sum(len(line) == 1 for line in lines)
            if process.exitcode and not started:
                raise SystemExit(f"echo: {root}: corpus synthesis failed (exit code {process.exitcode})")
            if process.exitcode:  # eSpeak crashed on the last utterance it started
                failed.add(items[started - 1]["file_name"])
                queue += [items[started:]] if items[started:] else []
    for voice, count in sorted(collections.Counter(r["voice"] for r in plan if r["file_name"] in failed).items()):
        print(f"echo: warning: eSpeak NG voice {voice!r} refused, crashed or gave no audio: {count} utterances skipped",
              file=sys.stderr)
    plan = [r for r in plan if r["file_name"] not in failed]
    for split in SPLITS:
        with open(partial / split / "metadata.csv", "w", newline="") as f:
            (writer := csv.DictWriter(f, fieldnames=[k for k in plan[0] if k != "split"], extrasaction="ignore")).writeheader()
            writer.writerows({**r, "file_name": os.path.basename(r["file_name"])} for r in plan if r["split"] == split)
    paths = sorted(f for f in partial.rglob("*") if f.is_file())
    files, size_mb = {str(f.relative_to(partial)): crc(f) for f in paths}, sum(f.stat().st_size for f in paths) / 2**20
    (partial / "done").write_text(json.dumps({"seconds": round(time.time() - t0, 1), "megabytes": round(size_mb, 1),
                                              "crc32": files}))
    partial.rename(root)
    print(f"embedded corpus: {len(plan)} utterances in {time.time() - t0:.0f} s, {size_mb:.0f} MB at {root}")
    return str(root)

def decode_audio(audio):
    """A datasets Audio(decode=False) value ({'bytes', 'path'}) or a path -> mono float32 at 16 kHz."""
    source = audio if isinstance(audio, str) else (io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"])
    try:
        wave, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for unreadable files
        raise BadInput(f"cannot read audio ({str(e).splitlines()[0]})") from None
    if wave.size == 0 or not np.isfinite(wave).all():
        raise BadInput("audio has zero samples" if wave.size == 0 else "audio contains NaN or Inf samples")
    wave = torchaudio.functional.resample(torch.from_numpy(wave.mean(axis=1)), rate, SAMPLE_RATE)  # downmixed; as is at 16 kHz
    if wave.numel() < 4 * HOP:
        raise BadInput(f"audio too short ({wave.numel() / SAMPLE_RATE * 1000:.0f} ms)")
    return wave

@functools.cache
def mel_filterbank():
    return torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=HOP, n_mels=N_MELS, f_max=8000.0)

def log_mel(wave):
    """(samples,) float32 at 16 kHz -> (frames, 80) log-mel, 25 ms window, 10 ms hop, 0-8 kHz, Whisper scaling."""
    mel = mel_filterbank()(wave).clamp(min=1e-10).log10()
    return ((torch.maximum(mel, mel.max() - 8.0) + 4.0) / 4.0).T.contiguous()

def yin_f0(waves, window=512):
    """Batched YIN pitch tracker (de Cheveigne & Kawahara 2002) in torch, so it runs on any device:
    waves (batch, samples) float32 at 16 kHz -> f0 in Hz and voiced, each (batch, samples // 160 + 1); frame k
    is centred at k*10 ms. The difference function d(tau) = E_0 + E_tau - 2 r(tau) comes from one FFT per frame;
    the period is the first dip of the cumulative-mean-normalised d' below YIN_DIP (else its global minimum),
    refined by a parabola. A frame is voiced when d' there is below YIN_VOICED and the frame is within SILENCE_DB of
    the utterance's loudest frame. Unvoiced frames have f0 = 0. Then the track is cleaned (README, f0)."""
    lag_min, lag_max = int(SAMPLE_RATE / F0_MAX), math.ceil(SAMPLE_RATE / F0_MIN)
    span, n_frames = window + lag_max + 2, waves.shape[-1] // HOP + 1
    raw = F.pad(waves, (window // 2, span)).unfold(-1, span, HOP)[:, :n_frames]  # (batch, frames, span)
    frames, n_fft = raw - raw.mean(-1, keepdim=True), 1 << (span - 1).bit_length()
    spectrum, head = torch.fft.rfft(frames, n_fft), torch.fft.rfft(frames[..., :window], n_fft)
    lags = torch.arange(lag_max + 2, device=waves.device)
    correlation = torch.fft.irfft(spectrum * head.conj(), n_fft)[..., :lag_max + 2]  # r(tau) = sum_j x_j x_(j+tau)
    energy = F.pad(frames.square().cumsum(-1), (1, 0))
    diff = (energy[..., window, None] + energy[..., window:span] - energy[..., :lag_max + 2] - 2 * correlation).clamp(min=0)
    cmnd = diff[..., 1:] * lags[1:] / diff[..., 1:].cumsum(-1).clamp(min=1e-12)  # d'(tau) for tau = 1 .. lag_max+1
    inner, in_range = cmnd[..., 1:-1], lags[2:-1] >= lag_min  # tau = 2 .. lag_max: each has both neighbours
    is_dip = (inner <= cmnd[..., :-2]) & (inner < cmnd[..., 2:]) & in_range & (inner < YIN_DIP)
    fallback = inner.masked_fill(~in_range, float("inf")).argmin(-1)
    best = torch.where(is_dip.any(-1), is_dip.int().argmax(-1), fallback).unsqueeze(-1) + 1  # index into cmnd
    left, centre, right = cmnd.gather(-1, best - 1), cmnd.gather(-1, best), cmnd.gather(-1, best + 1)
    shift = (0.5 * (left - right) / (left - 2 * centre + right).clamp(min=1e-12)).clamp(-1, 1)
    period = (best + 1 + shift).squeeze(-1)  # lag of cmnd index i is i + 1
    level = raw[..., :window].square().mean(-1)  # the frame's own 32 ms (the span's mean reaches beyond it)
    loud = 10 * torch.log10(level / level.amax(-1, keepdim=True).clamp(min=1e-20) + 1e-20) > SILENCE_DB
    voiced = (centre.squeeze(-1) < YIN_VOICED) & loud
    # spikes (at voicing onsets, mostly: the first dip is a formant's period) take the median of the +-4 frames of
    # their voiced run; runs shorter than MIN_RUN are unvoiced
    log_f0 = torch.where(voiced, (SAMPLE_RATE / period).log2(), float("nan"))
    run = (voiced & ~F.pad(voiced, (1, 0))[..., :-1]).cumsum(-1)
    same_run = F.pad(run, (4, 4), value=-1).unfold(-1, 9, 1) == run[..., None]
    neighbours = F.pad(log_f0, (4, 4), value=float("nan")).unfold(-1, 9, 1).masked_fill(~same_run, float("nan"))
    median = neighbours.nanmedian(-1).values
    log_f0 = torch.where((log_f0 - median).abs() > SPIKE_OCTAVES, median, log_f0)
    voiced = voiced & ((~neighbours.isnan()).sum(-1) >= MIN_RUN)
    # YIN compares x_j with x_(j + period): an estimate belongs half a period after its frame's centre; move it back
    previous = F.pad(log_f0, (1, 0), value=float("nan"))[..., :-1]
    moved = log_f0 - (log_f0 - previous) * SAMPLE_RATE / (2 * HOP) / log_f0.exp2()
    return torch.where(voiced, torch.where(previous.isnan(), log_f0, moved).exp2(), 0.0), voiced

def fit_frames(x, n):
    """Cut or zero-pad the last axis to n: how a track a few frames off the log-mel is aligned to it."""
    return x[..., :n] if x.shape[-1] >= n else F.pad(x, (0, n - x.shape[-1]))

def extract_f0(wave, sample_rate=SAMPLE_RATE):
    """f0 in Hz and a voicing flag per 10 ms frame (frame k centred at k*10 ms), aligned 1:1 with log_mel:
    (samples,) array or tensor at any rate -> two (samples * 16000 // rate // 160 + 1,) tensors, by yin_f0."""
    wave = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(-1)
    n_frames = len(wave) * SAMPLE_RATE // sample_rate // HOP + 1  # the frame count at the input rate
    f0, voiced = yin_f0(torchaudio.functional.resample(wave, sample_rate, SAMPLE_RATE)[None])
    return fit_frames(f0, n_frames)[0], fit_frames(voiced.float(), n_frames)[0] > 0  # resampling may add a frame

def featurize(waves, keep_wave=False, device=torch.device("cpu")):
    """16 kHz waveforms -> per utterance a dict of log-mel (frames, 80), f0 and voiced (frames,), and the waveform
    (float16) for its stream. On a GPU yin_f0 takes 32 utterances at once; on a CPU one at a time is faster."""
    group, out = 32 if device.type == "cuda" else 1, []
    for start in range(0, len(waves), group):
        chunk = waves[start:start + group]
        f0, voiced = yin_f0(nn.utils.rnn.pad_sequence(chunk, batch_first=True).to(device))
        for wave, f0_row, voiced_row in zip(chunk, f0.cpu(), voiced.cpu()):
            mel = log_mel(wave)
            n = min(len(mel), len(wave) // HOP + 1)  # yin_f0's frame count for this utterance alone
            out.append({"mel": mel[:n].half().numpy(), "f0": f0_row[:n].numpy(), "voiced": voiced_row[:n].numpy()}
                       | ({"wave": wave.half().numpy()} if keep_wave else {}))
    return out

# ---- data: loading, batches and augmentation (every source through Hugging Face datasets, cached by .map)
FEATURES = {"mel": datasets.Array2D((None, N_MELS), "float16"), "f0": datasets.Sequence(datasets.Value("float32")),
            "voiced": datasets.Sequence(datasets.Value("bool")), "wave": datasets.Sequence(datasets.Value("float16")),
            "text": datasets.Value("string"), "n_frames": datasets.Value("int32"), "error": datasets.Value("string")}

def _featurize_examples(batch, text_column, keep_wave, max_seconds, device):
    """datasets .map function (batched): decode and check each utterance, then featurize the usable ones together.
    A failure becomes an error string naming the file, with empty features."""
    waves, texts, errors = [], [], []
    for audio, text in zip(batch["audio"], batch[text_column]):
        text, error = normalize_text(text or ""), ""
        try:
            if not text:
                raise BadInput("empty transcript")
            wave = decode_audio(audio)
            if wave.abs().max() < SILENCE_PEAK:  # nothing to learn from (--transcribe gives it an empty line)
                raise BadInput("silent audio (peak below -80 dBFS)")
            if len(wave) > max_seconds * SAMPLE_RATE:  # its transcript would not match a cut, so it is skipped
                raise BadInput(f"{len(wave) / SAMPLE_RATE:.1f} s is longer than --max_seconds {max_seconds}")
            waves.append(wave)
        except BadInput as e:
            text, error = "", f"{audio.get('path') or '<in-memory audio>'}: {e}"
        texts.append(text)
        errors.append(error)
    features = iter(featurize(waves, keep_wave, device))
    empty = {"mel": np.zeros((0, N_MELS), np.float16), "f0": np.zeros(0, np.float32), "voiced": np.zeros(0, bool)}
    empty |= {"wave": np.zeros(0, np.float16)} if keep_wave else {}
    utterances = [next(features) if not error else empty for error in errors]
    return {key: [u[key] for u in utterances] for key in empty} | {"text": texts, "error": errors,
                                                                    "n_frames": [len(u["mel"]) for u in utterances]}

def local_folder(folder, hf_cache):
    """A folder's metadata.csv (file_name,transcription,...) -> Dataset, its 'audio' column of paths as on the hub; not
    by map: a lambda's hash holds its module, which --jobs processes name otherwise, so they would featurise again."""
    ds = datasets.load_dataset("csv", data_files=os.path.join(folder, "metadata.csv"), split="train", cache_dir=hf_cache,
                               keep_default_na=False)
    if "file_name" not in ds.column_names or "audio" in ds.column_names:  # Echo makes 'audio' from file_name
        raise SystemExit(f"echo: {folder}/metadata.csv: wants a file_name column and none named audio")
    return ds.add_column("audio", [os.path.join(folder, f) for f in ds["file_name"]])

def raw_splits(args, hf_cache):
    """{split: Dataset of audio + transcript} from the embedded corpus, a local folder (split subfolders, or one flat
    folder split 90/5/5) or the hub (a one-line error offline, after a 3 s reachability check, not 26 s of retries)."""
    names = dict(zip(("train", "validation", "test"), args.splits.split(",")))
    if args.dataset in CORPORA or os.path.isdir(args.dataset):
        root = (build_corpus(args.cache_dir, args.corpus_size, args.corpus_seed, args.num_proc, args.dataset)
                if args.dataset in CORPORA else args.dataset)
        raw = {split: local_folder(os.path.join(root, names.get(split, split)), hf_cache) for split in SPLITS
               if os.path.exists(os.path.join(root, names.get(split, split), "metadata.csv"))}
        if "train" not in raw and os.path.exists(os.path.join(root, "metadata.csv")):
            held = local_folder(root, hf_cache).train_test_split(test_size=0.1, seed=args.corpus_seed)
            halves = held["test"].train_test_split(test_size=0.5, seed=args.corpus_seed)
            raw = {"train": held["train"], "validation": halves["train"], "test": halves["test"]}
        return raw
    hint = "Use a local folder instead: --dataset path/to/folder with audio files and metadata.csv (file_name,transcription)"
    try:
        os.environ.get("HF_HUB_OFFLINE") or socket.create_connection(("huggingface.co", 443), timeout=3.0).close()
    except OSError:
        raise SystemExit(f"echo: cannot reach the Hugging Face hub for {args.dataset!r} (offline?). {hint}") from None
    try:
        return {split: datasets.load_dataset(args.dataset, args.dataset_config, split=name, cache_dir=hf_cache,
                                             streaming=args.streaming and split == "train") for split, name in names.items()}
    except Exception as e:
        raise SystemExit(f"echo: cannot load hub dataset {args.dataset!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}). {hint}") from None

def feature_code_hash():
    """The feature code's own source and constants: part of each split's cache key, so that editing them recomputes
    the features (datasets' fingerprint of the map function does not follow the functions it calls)."""
    functions = (normalize_text, decode_audio, mel_filterbank, log_mel, yin_f0, featurize, _featurize_examples)
    constants = (SAMPLE_RATE, HOP, N_MELS, F0_MIN, F0_MAX, YIN_DIP, YIN_VOICED, SILENCE_DB, SILENCE_PEAK, SPIKE_OCTAVES, MIN_RUN)
    return hashlib.sha256(repr(([inspect.getsource(f) for f in functions], constants)).encode()).hexdigest()[:16]

def load_splits(args):
    """-> {split: Dataset with mel, f0, voiced, text, n_frames}, cached per split, and the skipped utterances; with
    --streaming the train split is an IterableDataset that computes the same columns (and 'error') as it is read."""
    datasets.disable_progress_bars()
    threads, device = torch.get_num_threads(), pick_device(args.device)  # on a GPU: f0 batched, in this process
    if args.num_proc > 1 and device.type == "cpu":  # forked feature workers inherit this: one thread per core each
        torch.set_num_threads(1)
    if "train" not in (raw := raw_splits(args, os.path.join(args.cache_dir, "hf"))):
        raise SystemExit(f"echo: {args.dataset}: no train split (want <folder>/train/metadata.csv or <folder>/metadata.csv)")
    out, skipped = {}, []
    for split, ds in raw.items():
        text_column = next(c for c in ("transcription", "text", "sentence", "raw_transcription") if c in ds.column_names)
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
        keep_wave = "waveform" in args.streams or (split == "train" and audio_augmented(args))
        kwargs = {"text_column": text_column, "keep_wave": keep_wave, "max_seconds": args.max_seconds}
        features = datasets.Features({k: v for k, v in FEATURES.items() if keep_wave or k != "wave"})
        common = dict(batched=True, batch_size=16, remove_columns=ds.column_names, features=features)
        if split == "train" and args.streaming:  # featurised lazily, where it is read (DataLoader workers); no cache
            ds = ds.to_iterable_dataset(num_shards=min(len(ds), 64)) if isinstance(ds, datasets.Dataset) else ds
            out[split] = ds.map(_featurize_examples, fn_kwargs=kwargs | {"device": torch.device("cpu")}, **common)
            continue
        ds = ds.map(_featurize_examples, fn_kwargs=kwargs | {"device": device}, **common, desc=f"features {split}",
                    new_fingerprint=datasets.fingerprint.Hasher.hash((ds._fingerprint, feature_code_hash(), kwargs)),
                    num_proc=args.num_proc if len(ds) >= 100 and device.type == "cpu" else None)
        skipped += ds.filter(bool, input_columns="error")["error"]  # builtins: a lambda's hash differs in --jobs processes
        out[split] = ds.filter(operator.not_, input_columns="error").with_format("numpy")
    torch.set_num_threads(threads)
    return out, skipped

def length_batches(lengths, batch_frames, rng=None):
    """Batches of indices, sorted by length, whose padded size (longest x count) stays within batch_frames. With rng
    (training): sorted within shuffled windows of BUCKET_WINDOW, batches shuffled; a resumed run gets the same order."""
    lengths, order = list(lengths), list(range(len(lengths)))  # a list: indexing a datasets Column row by row is slow
    if rng is not None:
        rng.shuffle(order)
    window, batches = BUCKET_WINDOW if rng is not None else max(1, len(order)), []
    for start in range(0, len(order), window):
        batches.append([])
        for i in sorted(order[start:start + window], key=lambda i: lengths[i]):  # so i is its batch's longest
            if batches[-1] and lengths[i] * (len(batches[-1]) + 1) > batch_frames:
                batches.append([])
            batches[-1].append(i)
    if rng is not None:
        rng.shuffle(batches)
    return batches

def rows(dataset, indices):
    """Rows of a numpy-formatted Dataset as dicts, fetched in one slice per column."""
    columns = dataset[list(indices)]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]

def collate(items, tokenizer=None):
    """Feature dicts -> padded batch. mel (B, T, 80) zero-padded, f0/voiced (B, T), frames (B,), wave (B, samples)
    when the items have it; with a tokenizer also tokens (B, L+1): BOS text EOS, PAD-filled."""
    pad = lambda key, dtype: nn.utils.rnn.pad_sequence([torch.from_numpy(np.array(it[key], dtype=dtype)) for it in items],
                                                       batch_first=True)
    batch = {"mel": pad("mel", np.float32), "f0": pad("f0", np.float32), "voiced": pad("voiced", bool),
             "frames": torch.tensor([len(it["mel"]) for it in items]), "text": [str(it["text"]) for it in items]}
    batch |= {"wave": pad("wave", np.float32)} if "wave" in items[0] else {}
    if tokenizer is not None:
        ids = [torch.tensor([BOS] + tokenizer.encode(t) + [EOS]) for t in batch["text"]]
        batch["tokens"] = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=PAD)
    return batch

def to_device(batch, device):
    """The batch's tensors on the device (its texts stay behind: torch.compile would recompile for every new one)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}

def audio_augmented(args):
    return bool(args.speed_perturb or args.noise_snr or args.reverb or args.bandpass)

def perturb_audio(items, rng, args):
    """Training audio augmentation seeded by rng, in the order a signal meets them (README, Augmentation). Items need
    'wave'; a changed one gets its log-mel and f0 recomputed, so the f0 track is that of the audio the model hears."""
    changed = {}
    for i, item in enumerate(items):
        wave = torch.from_numpy(np.asarray(item["wave"], dtype=np.float32))
        speed = float(rng.choice(SPEED_FACTORS)) if args.speed_perturb else 1.0
        wave = torchaudio.functional.resample(wave, round(100 * speed), 100)  # read at speed * 16 kHz, played at 16 kHz
        if args.reverb:
            tail = torch.from_numpy(rng.standard_normal(int(rng.uniform(*REVERB_RT60) * SAMPLE_RATE), dtype=np.float32))
            tail *= 10 ** (-3 * torch.arange(len(tail)) / len(tail))  # -60 dB at its end: a room of that RT60
            wave = torchaudio.functional.fftconvolve(wave, F.pad(tail / tail.norm(), (1, 0), value=1.0))[:len(wave)]
        if args.bandpass:
            wave = torchaudio.functional.highpass_biquad(wave, SAMPLE_RATE, rng.uniform(*BANDPASS_HZ[0]))
            wave = torchaudio.functional.lowpass_biquad(wave, SAMPLE_RATE, rng.uniform(*BANDPASS_HZ[1]))
        if args.noise_snr:
            noise = torch.from_numpy(rng.standard_normal(len(wave), dtype=np.float32))
            wave = wave + noise * (wave.square().mean() / 10 ** (rng.uniform(*args.noise_snr) / 10)).sqrt()
        if speed != 1.0 or args.reverb or args.bandpass or args.noise_snr:
            changed[i] = wave
    features = dict(zip(changed, featurize(list(changed.values()), keep_wave=True)))
    return [item | features.get(i, {}) for i, item in enumerate(items)]

def spec_augment(batch, rng):
    """SpecAugment as ESPnet's LibriSpeech-100 recipe (SPECAUG_MASKS, no time warping): only log-mel inside utterances."""
    (freq_masks, max_bins, time_masks, max_time), mel = SPECAUG_MASKS, batch["mel"].clone()
    for i, n in enumerate(batch["frames"].tolist()):
        own, fill = mel[i, :n], mel[i, :n].mean()
        for count, widest, view in ((freq_masks, max_bins, own.T), (time_masks, int(max_time * n), own)):
            for _ in range(count):
                start = rng.integers(0, len(view) - (width := rng.integers(0, widest + 1)) + 1)  # width drawn first
                view[start:start + width] = fill
    return batch | {"mel": mel}

def vocal_tract_warp(batch, rng):
    """--vtlp: each utterance's log-mel read at f / a, a uniform in 1 +- VTLP_WARP, linearly between its bands: formants
    move as a shorter (a > 1) or longer vocal tract's would (Jaitly & Hinton 2013); the f0 track stays the audio's."""
    centres = librosa.mel_frequencies(N_MELS + 2, fmax=8000, htk=True)[1:-1]  # log_mel's bands (torchaudio's HTK mel)
    source = np.interp(centres / rng.uniform(1 - VTLP_WARP, 1 + VTLP_WARP, (len(batch["mel"]), 1)), centres, np.arange(N_MELS))
    weights = np.clip(1 - np.abs(np.arange(N_MELS)[:, None] - source[:, None]), 0, None)  # (B, from, to): interpolation
    return batch | {"mel": batch["mel"] @ torch.from_numpy(weights.astype(np.float32))}

def tempo_stretch(items, rng):
    """--tempo: each utterance's n frames of 10 ms (log-mel, f0, voicing; the waveform in 10 ms pieces) resampled to n / a,
    each the frame nearest its centre, a uniform in 1 +- TEMPO_WARP: the speech a times faster, at the same pitch."""
    def pick(item, n, m):
        at = np.round((np.arange(m) + 0.5) * n / m - 0.5).astype(int).clip(0, n - 1)  # (m,) source frames
        wave = {"wave": np.pad(item["wave"], (0, n * HOP))[:n * HOP].reshape(n, HOP)[at].ravel()} if "wave" in item else {}
        return item | wave | {k: np.asarray(item[k])[at.clip(max=len(item[k]) - 1)] for k in ("mel", "f0", "voiced")}
    return [pick(it, n := len(it["mel"]), max(1, round(n / rng.uniform(1 - TEMPO_WARP, 1 + TEMPO_WARP)))) for it in items]

def training_batch(items, tokenizer, args, key):
    """One augmented training micro-batch, seeded by (seed, epoch, first utterance): any worker or rank builds the same."""
    rng = np.random.default_rng([args.seed, *key])
    items = perturb_audio(items, rng, args) if audio_augmented(args) else items
    batch = collate(tempo_stretch(items, rng) if args.tempo else items, tokenizer)
    batch = vocal_tract_warp(batch, rng) if args.vtlp else batch
    return spec_augment(batch, rng) if args.specaug else batch

def cached_batch(train_set, tokenizer, args, epoch, indices):
    return training_batch(rows(train_set, indices), tokenizer, args, (epoch, indices[0]))

class StreamingBatches(torch.utils.data.IterableDataset):
    """--streaming: micro-batches of load_splits' featurising stream, shuffled and length-bucketed BUCKET_WINDOW
    utterances at a time, each DataLoader worker on its own shards; each says how many unusable ones it skipped."""
    def __init__(self, stream, tokenizer, args, epoch):
        self.stream, self.tokenizer, self.args, self.epoch = stream, tokenizer, args, epoch

    def __iter__(self):
        (stream := self.stream.shuffle(seed=self.args.seed, buffer_size=BUCKET_WINDOW)).set_epoch(self.epoch)
        examples, skipped, rng = iter(stream), 0, random.Random(self.args.seed * 100003 + self.epoch)  # each window shuffled anew
        for chunk in iter(lambda: list(itertools.islice(examples, BUCKET_WINDOW)), []):
            usable = [e for e in chunk if not e["error"] and set(e["text"]) <= set(self.tokenizer.index)]
            skipped += len(chunk) - len(usable)
            for indices in length_batches([len(e["mel"]) for e in usable], self.args.batch_frames, rng):
                items = [usable[i] for i in indices]
                key = (self.epoch, zlib.crc32(items[0]["text"].encode()))
                yield training_batch(items, self.tokenizer, self.args, key) | {"skipped": skipped}
                skipped = 0

# ---- model
class RMSNorm(nn.RMSNorm):  # computed in float32 whatever the input's dtype (bf16 under autocast)
    def __init__(self, dim):
        super().__init__(dim, eps=1e-6)

    def forward(self, x):
        return super().forward(x.float()).type_as(x)

def rope_freqs(head_dim, kind="standard", theta=10000.0):
    """Rotary angular steps per position, one per channel pair, highest first: (head_dim/2,) float64. mel: mel-spaced
    (as between 20 Hz and 8 kHz) with the top step 0.99 pi / SPEED_RANGE[1]: no step exceeds pi at any pitch speed."""
    k = torch.arange(head_dim // 2, dtype=torch.float64)
    if kind == "standard":
        return theta ** (-2 * k / head_dim)
    hz = torch.from_numpy(librosa.mel_frequencies(len(k), fmin=20.0, fmax=8000.0, htk=True)[::-1].copy())
    return hz / 8000.0 * 0.99 * math.pi / SPEED_RANGE[1]

def rotary(positions, freqs):
    """positions (B, T), possibly fractional -> e^(i angle): (B, 1, T, head_dim/2) complex64.
    Angles in float64: pitch-warped positions grow without bound and only their differences matter."""
    angle = positions.double()[..., None] * freqs.to(positions.device)
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)[:, None]

def apply_rotary(x, table):
    """Multiply each consecutive channel pair of x (B, H, T, head_dim), read as a complex number, by the complex table
    (B, 1 or H, T, head_dim/2), radius included: the exact product in float32, several times faster than cos/sin."""
    return torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * table).flatten(-2).type_as(x)

def pitch_track(f0, voiced, frames, n_out):
    """Per-10 ms f0 (B, T') and voicing -> per encoder frame (B, n_out): mean log2 f0 of the voiced 10 ms
    frames in each 40 ms group, voiced where at least two of the four are. A track a frame or two longer or
    shorter than the log-mel is cut or padded with unvoiced frames; NaN, Inf and f0 <= 0 count as unvoiced."""
    f0, voiced = fit_frames(f0, n := 4 * n_out), fit_frames(voiced, n)
    voiced = voiced.bool() & (torch.arange(n, device=f0.device) < frames[:, None]) & torch.isfinite(f0) & (f0 > 0)
    log_f0 = torch.where(voiced, f0.float().nan_to_num(1.0).clamp(min=1.0).log2(), 0.0)
    count = voiced.view(len(f0), n_out, 4).sum(-1)
    log_f0, voiced = log_f0.view(len(f0), n_out, 4).sum(-1) / count.clamp(min=1), count >= 2
    return torch.where(voiced, log_f0, 0.0), voiced

class PitchPrior(nn.Module):
    """What encoder self-attention knows about pitch, once per batch: the rotary table (pitch-warped phase, radius) and
    the mask (padding, pitch bias, zero-value offset). With every flag off, standard RoPE and a key-padding mask."""
    def __init__(self, head_dim, n_heads, f0_theta=False, radii=False, pitch_bias=False, zero_value=False, freqs="standard"):
        super().__init__()
        self.f0_theta = f0_theta
        self.register_buffer("freqs", rope_freqs(head_dim, freqs), persistent=False)
        assert float(self.freqs.max()) * SPEED_RANGE[1] <= math.pi, "a rotary step above pi aliases"
        self.radius_strength = nn.Parameter(torch.full((n_heads,), RADIUS_INIT)) if radii else None
        self.pitch_bias = nn.Parameter(torch.full((n_heads,), PITCH_BIAS_INIT)) if pitch_bias else None
        self.zero_value = nn.Parameter(torch.zeros(n_heads)) if zero_value else None

    def speed(self, log_f0, voiced):
        """Pitch-warp speed s_t = f0_t / F0_REF on voiced frames (clamped), 1 elsewhere: (B, T)."""
        return torch.where(voiced & self.f0_theta, (log_f0.exp2() / F0_REF).clamp(*SPEED_RANGE), 1.0)

    def radius(self, log_f0, voiced):
        """r = exp(alpha_h * (tanh(z) - mean tanh(z))) with z the utterance's log-f0 z-score: geometric mean 1 over
        voiced frames, 1 on unvoiced frames and padding, in [1/RADIUS_MAX, RADIUS_MAX] since |alpha_h| <= ln(R)/2."""
        count = voiced.sum(1, keepdim=True).clamp(min=1)
        mean = (log_f0 * voiced).sum(1, keepdim=True) / count
        std = (((log_f0 - mean) ** 2 * voiced).sum(1, keepdim=True) / count).sqrt().clamp(min=0.05)
        z = torch.tanh((log_f0 - mean) / std) * voiced
        z, alpha = (z - z.sum(1, keepdim=True) / count) * voiced, 0.5 * math.log(RADIUS_MAX) * torch.tanh(self.radius_strength)
        return torch.exp(alpha[None, :, None] * z[:, None, :])  # (B, H, T)

    def forward(self, log_f0, voiced, valid):
        """log_f0, voiced, valid: (B, T) -> rotary table (complex (B, 1 or H, T, head_dim/2)) and attention mask
        (bool (B, 1, 1, T), or float (B, H, T, T) with -inf on padding when a bias is on)."""
        speed = self.speed(log_f0, voiced).double()
        table = rotary(speed.cumsum(1) - speed, self.freqs)  # phase_t = omega * sum_{tau < t} s_tau
        if self.radius_strength is not None:
            table = table * self.radius(log_f0, voiced)[..., None]
        mask = valid[:, None, None, :]
        if self.pitch_bias is None and self.zero_value is None:
            return table, mask
        bias = torch.zeros(len(valid), 1, valid.shape[1], valid.shape[1], device=valid.device)
        if self.pitch_bias is not None:
            octaves = (log_f0[:, :, None] - log_f0[:, None, :]).abs() * (voiced[:, :, None] & voiced[:, None, :])
            bias = bias - F.softplus(self.pitch_bias)[None, :, None, None] * octaves[:, None]
        if self.zero_value is not None:
            bias = bias + self.zero_value[None, :, None, None] * (~voiced & valid)[:, None, None, :]
        return table, bias.masked_fill(~mask, float("-inf"))

class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention. Self-attention when context is None."""
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        self.n_heads, self.keep_weights, self.weights = n_heads, False, None  # diagnostics: head-averaged weights (B, T, S)

    def heads(self, x):
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # (B, T, D) -> (B, H, T, D/H)

    def forward(self, x, context=None, table=None, mask=None, causal=False, cache=None):
        """x (B, T, D); context (B / k, S, D) for cross-attention, read by k consecutive rows of x (beam search: k = beam);
        table: rotary for q and k; mask: bool, True = may attend, broadcast to (B, H, T, S); cache: past keys/values."""
        q = self.heads(self.q(x))
        if context is not None and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]  # cross-attention keys of the audio are computed once per utterance
        else:
            k, v = (self.heads(linear(x if context is None else context)) for linear in (self.k, self.v))
            if table is not None:
                q, k = apply_rotary(q, table), apply_rotary(k, table)
            if cache is not None:
                if context is None and "k" in cache:
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                cache["k"], cache["v"] = k, v
        q = q.unflatten(0, (len(k), -1)).transpose(1, 2).flatten(2, 3)  # (B / k, H, k * T, D/H): k rows, one context
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and cache is None)
        out = out.unflatten(2, (-1, x.shape[1])).transpose(1, 2).flatten(0, 1)  # (B, H, T, D/H), rows of q again
        if self.keep_weights:  # the figures' weights (never causal), which SDPA does not return: with the identity matrix
            eye = torch.eye(k.shape[2], device=k.device).expand(*k.shape[:2], -1, -1)  # as values, its output is them
            self.weights = F.scaled_dot_product_attention(q.float(), k.float(), eye, attn_mask=mask).mean(1).detach()
        return self.o(out.transpose(1, 2).flatten(2))

class Gate(nn.Module):
    """A scalar gate per position on a block's MLP output, (B, T, D) -> (B, T, 1) in (0, 1): README's --gate kinds."""
    def __init__(self, kind, d_model, memory=64):
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.proj = nn.Linear(d_model, 1)
        elif kind == "t":
            self.gates, self.mix = nn.Linear(d_model, 4), nn.Linear(d_model, 4)
        else:
            self.proj = nn.Sequential(nn.Linear(d_model, d_model // 2), nn.SiLU(), nn.Linear(d_model // 2, 1))
            self.memory_keys = nn.Parameter(torch.randn(memory, d_model) / math.sqrt(d_model))
            self.memory_values = nn.Parameter(torch.randn(memory, 1))

    def forward(self, x):
        if self.kind == "mlp":
            return torch.sigmoid(self.proj(x))
        if self.kind == "t":
            return (torch.sigmoid(self.gates(x)) * torch.softmax(self.mix(x), -1)).sum(-1, keepdim=True)
        read = torch.softmax(x @ self.memory_keys.T / math.sqrt(x.shape[-1]), -1) @ self.memory_values
        return 0.5 * (torch.sigmoid(self.proj(x)) + torch.sigmoid(read))

class Block(nn.Module):
    """Pre-norm residual block: self-attention, optional cross-attention, optional depthwise convolution over time
    (Conformer's, less its pointwise layers), MLP scaled by an optional Gate."""
    depthwise = staticmethod(torch.compiler.disable(lambda conv, x: conv(x.mT[:, :, None])[:, :, 0].mT))  # (B, T, D), shared
    def __init__(self, d_model, n_heads, cross=False, gate="none", gate_memory=64, conv=0, mlp=2):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(d_model), Attention(d_model, n_heads)
        self.cross_norm, self.cross = (RMSNorm(d_model), Attention(d_model, n_heads)) if cross else (None, None)
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp * d_model), nn.GELU(), nn.Linear(mlp * d_model, d_model))
        self.gate = Gate(gate, d_model, gate_memory) if gate != "none" else None
        self.conv_norm, self.conv = (RMSNorm(d_model), nn.Conv2d(d_model, d_model, (1, conv), padding=(0, conv // 2),
                                                                 groups=d_model)) if conv else (None, None)

    def forward(self, x, table=None, mask=None, causal=False, context=None, context_mask=None, cache=None, valid=None):
        x = x + self.attn(self.attn_norm(x), table=table, mask=mask, causal=causal,
                          cache=None if cache is None else cache.setdefault("self", {}))
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), context=context, mask=context_mask,
                               cache=None if cache is None else cache.setdefault("cross", {}))
        if self.conv is not None:  # depthwise filter, padding zeroed; eager under --compile: inductor (2.14) fails on it
            x = x + F.silu(self.depthwise(self.conv, self.conv_norm(x) * valid[..., None]))
        h = self.mlp_norm(x)
        return x + (self.mlp(h) if self.gate is None else self.gate(h) * self.mlp(h))

class Stem(nn.Module):
    """A stream's conv front-end, two stride-2 convolutions: (B, C, T) at 100 frames/s -> (B, ceil(T/4), D). The padding is
    zeroed after every conv, so an utterance sees the same zero border alone or inside a batch."""
    def __init__(self, channels, d_model):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(in_channels, d_model, 3, stride=stride, padding=1)
                                   for in_channels, stride in ((channels, 2), (d_model, 2)))

    def forward(self, x, frames):
        for conv in self.convs:
            x, frames = F.gelu(conv(x)), (frames + conv.stride[0] - 1) // conv.stride[0]
            x = x * (torch.arange(x.shape[-1], device=x.device) < frames[:, None])[:, None]
        return x.transpose(1, 2).contiguous()  # (B, T, D) in memory: a strided residual stream slows every op after it

def pitch_input(f0, voiced, n):
    """(B, T') f0 and voicing -> (B, 3, n), 0 on unvoiced frames: log2(f0 / 220 Hz); log2 f0 less the utterance's voiced
    mean (as Kaldi's pitch features), so that a tone's height reads the same for every speaker; voicing."""
    f0 = fit_frames(f0, n)
    voiced = fit_frames(voiced, n).bool() & torch.isfinite(f0) & (f0 > 0)
    octaves = torch.where(voiced, (f0.nan_to_num(F0_REF).clamp(min=1.0) / F0_REF).log2(), 0.0)
    relative = octaves - octaves.sum(1, keepdim=True) / voiced.sum(1, keepdim=True).clamp(min=1)
    return torch.stack([octaves, torch.where(voiced, relative, 0.0), voiced.float()], 1)

class Streams(nn.Module):
    """Feature streams -> encoder input (B, T/4, D): a Stem each, several fused by c_gate (README, Gates, streams)."""
    def __init__(self, names, d_model):
        super().__init__()
        self.names, channels = names, {"spectrogram": N_MELS, "pitch": 3, "waveform": 64}
        self.stems = nn.ModuleDict({name: Stem(channels[name], d_model) for name in names})
        self.filterbank = nn.Conv1d(1, 64, 400, stride=HOP, padding=200) if "waveform" in names else None
        self.c_gate = nn.Linear(len(names) * d_model, len(names)) if len(names) > 1 else None
        self.weights = None  # mean c_gate weight per stream of the last batch, for logging

    @torch.compiler.disable  # eager under --compile: inductor's conv backward specialises on T, recompiling for each length
    def forward(self, batch):
        frames, n = batch["frames"], batch["mel"].shape[1]
        inputs = {"spectrogram": lambda: batch["mel"].transpose(1, 2),
                  "pitch": lambda: pitch_input(batch["f0"], batch["voiced"], n),
                  "waveform": lambda: F.gelu(self.filterbank(batch["wave"][:, None]))}
        streams = [self.stems[name](fit_frames(inputs[name](), n), frames) for name in self.names]
        if self.c_gate is None:
            return streams[0]
        weights = torch.sigmoid(self.c_gate(torch.cat(streams, -1)))  # (B, T/4, streams)
        self.weights = weights.detach().flatten(0, 1).mean(0)
        return sum(weights[..., i:i + 1] * stream for i, stream in enumerate(streams))

class Encoder(nn.Module):
    """Streams + f0 -> (B, ceil(T/4), D): conv stems (40 ms frames), blocks with the PitchPrior's rotary and mask."""
    def __init__(self, c):
        super().__init__()
        self.streams = Streams(tuple(c.streams.split(",")), c.d_model)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, gate=c.gate, gate_memory=c.gate_memory, conv=c.conv, mlp=c.mlp)
                                    for _ in range(c.enc_layers))
        self.norm = RMSNorm(c.d_model)
        self.pitch = PitchPrior(c.d_model // c.n_heads, c.n_heads, c.f0_theta, c.radii, c.pitch_bias, c.zero_value, c.rope_freqs)

    def forward(self, batch):
        x, frames = self.streams(batch), batch["frames"]
        valid = torch.arange(x.shape[1], device=x.device) < ((frames + 3) // 4)[:, None]  # (B, T/4)
        table, mask = self.pitch(*pitch_track(batch["f0"], batch["voiced"], frames, x.shape[1]), valid)  # once per batch
        for block in self.blocks:
            x = block(x, table=table, mask=mask, valid=valid)
        return self.norm(x), valid

class Decoder(nn.Module):
    """tokens (B, L) + audio (B, S, D) -> logits (B, L, vocab): causal RoPE self-attention, plain cross-attention."""
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # small init keeps the first loss near ln(vocab)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, cross=True, gate=c.gate, gate_memory=c.gate_memory, mlp=c.mlp)
                                    for _ in range(c.dec_layers))
        self.norm = RMSNorm(c.d_model)
        self.register_buffer("freqs", rope_freqs(c.d_model // c.n_heads), persistent=False)

    def forward(self, tokens, audio, audio_valid, caches=None, offset=0):
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        x, table, context_mask = self.embed(tokens), rotary(positions, self.freqs), audio_valid[:, None, None, :]
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            x = block(x, table=table, causal=True, context=audio, context_mask=context_mask, cache=cache)
        return self.norm(x) @ self.embed.weight.T

class Echo(nn.Module):
    """The encoder-decoder with an auxiliary CTC head on the encoder, from a ModelConfig; lm: decode()'s CharLM or None."""
    def __init__(self, config):
        super().__init__()
        self.config, self.encoder, self.decoder, self.lm = config, Encoder(config), Decoder(config), None
        self.ctc_head = nn.Linear(config.d_model, config.vocab) if config.ctc_weight > 0 else None

    def named_blocks(self):
        return [(f"{part}.{i}", b) for part in ("encoder", "decoder") for i, b in enumerate(getattr(self, part).blocks)]

    def forward(self, batch):
        """Teacher-forced loss for a collated batch (tokens (B, L+1): BOS text EOS PAD...) -> (total, cross-entropy,
        ctc or None), total = (1 - w) * cross-entropy of the decoder + w * CTC of the encoder, w = ctc_weight."""
        audio, valid = self.encoder(batch)
        logits, targets = self.decoder(batch["tokens"][:, :-1], audio, valid), batch["tokens"][:, 1:]  # text, EOS, PAD...
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD)
        if self.ctc_head is None:
            return ce, ce, None
        log_probs = self.ctc_head(audio).float().log_softmax(-1).transpose(0, 1)
        ctc = F.ctc_loss(log_probs, targets, valid.sum(1), (targets > EOS).sum(1), blank=PAD, zero_infinity=True)
        return (1 - self.config.ctc_weight) * ce + self.config.ctc_weight * ctc, ce, ctc

# ---- optimizer
class MaxFactor(torch.optim.Optimizer):
    """MaxFactor (after sine2pi/Maxfactor): per parameter, with its own step count t, V is an EMA of G^2 of weight
    clamp(t^-0.8, 0.001, 0.999), for a matrix a row and a column EMA (V = R (x) C / max(R)); U = M / sqrt(V), M = G or,
    with momentum b, Nesterov's lerp(E, G, 1 - b), E an EMA of G of weight 1 - b; each row of U scaled to infinity-norm
    1, which cancels R (so R is not kept), steps by the scheduled lr; decoupled weight decay. README, Optimizers."""
    def __init__(self, params, lr=3e-3, weight_decay=0.0, momentum=0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                state, matrix = self.state[p], p.dim() >= 2
                if not state:
                    state |= {"step": 0} | ({"col": torch.zeros(p[0].numel(), device=p.device)} if matrix else
                                            {"second": torch.zeros_like(p, dtype=torch.float32)})
                t = state["step"] = state["step"] + 1
                beta, grad = min(max(t ** -0.8, 0.001), 0.999), p.grad.float().reshape(p.shape[0] if matrix else 1, -1)
                square = grad * grad + 1e-30
                v = state["col"].lerp_(square.mean(0), beta) if matrix else (  # a matrix's V: C alone, as the rows' scaling
                    state["second"].lerp_(square.view_as(p), beta).view(1, -1))  # cancels R
                if beta1 := group["momentum"]:  # Nesterov's: E, then a step from E towards G
                    grad = state.setdefault("momentum", torch.zeros_like(grad)).lerp_(grad, 1 - beta1).lerp(grad, 1 - beta1)
                update = grad * v.rsqrt()
                update = update / update.abs().amax(1, keepdim=True).clamp(min=1e-10)
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update.view_as(p).to(p.dtype), alpha=-group["lr"])

class Optimizers(list):
    """Optimizers stepped, scheduled and checkpointed as one (--optimizer muon: Muon, then MaxFactor)."""
    param_groups = property(lambda self: [group for optimizer in self for group in optimizer.param_groups])
    state = property(lambda self: {p: state for optimizer in self for p, state in optimizer.state.items()})
    step = lambda self: [optimizer.step() for optimizer in self]
    state_dict = lambda self: [optimizer.state_dict() for optimizer in self]
    load_state_dict = lambda self, states: [optimizer.load_state_dict(s) for optimizer, s in zip(self, states, strict=True)]

def build_optimizer(model, args, device):
    """--optimizer by name; weight decay on matrices only. muon: PyTorch's Muon (momentum orthogonalised by Newton-Schulz,
    its RMS matched to AdamW's) for the blocks' attention and MLP matrices, MaxFactor for the rest (README, Optimizers)."""
    hidden = lambda name: args.optimizer == "muon" and re.search(r"(attn|cross|mlp)\.\w+\.weight$", name)
    groups = [{"params": [p for name, p in model.named_parameters() if (p.dim() >= 2) == matrix and not hidden(name)],
               "weight_decay": args.weight_decay if matrix else 0.0} for matrix in (True, False)]
    if args.optimizer == "muon":
        matrices = [p for name, p in model.named_parameters() if hidden(name)]
        return Optimizers([torch.optim.Muon(matrices, args.lr, args.weight_decay, adjust_lr_fn="match_rms_adamw"),
                           MaxFactor(groups, args.lr, momentum=args.momentum)])
    if args.optimizer == "maxfactor":
        return MaxFactor(groups, lr=args.lr, momentum=args.momentum)
    if args.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=args.lr)
    return torch.optim.AdamW(groups, lr=args.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, fused=device.type == "cuda")

# ---- decoding and evaluation
def max_tokens_for(frames):
    return (frames.float() / 100 * MAX_CHARS_PER_SECOND).long() + 10

class CTCPrefixScorer:
    """CTC prefix scores for one growing hypothesis per utterance (joint CTC/attention decoding, Watanabe et al. 2017,
    as in ESPnet): log P(the audio's CTC paths start with this text). The recurrences r_t = (r_{t-1} + phi_{t-1}) p_t
    are solved over all frames at once (logcumsumexp, not a loop over frames), in float64, for the kept prefixes only."""
    NEG = -1e4  # log of "impossible" that keeps the closed form finite

    def __init__(self, log_probs, valid, width=1):
        """log_probs (B, T, V) from the CTC head, valid (B, T), each row repeated width times (one per beam slot).
        Frames past the end emit blank with probability 1, which changes no score, so one T serves the whole batch."""
        blank_only = torch.where(torch.arange(log_probs.shape[-1], device=log_probs.device) == PAD, 0.0, self.NEG).double()
        self.log_probs = torch.where(valid[..., None], log_probs.double(), blank_only).repeat_interleave(width, 0)
        self.cum_blank, self.probs = self.log_probs[..., PAD].cumsum(1)[..., None], self.log_probs.exp()  # (B, T, 1)
        self.r_n = torch.full_like(self.cum_blank, self.NEG)  # paths of the prefix ending in its last token
        self.r_b = self.cum_blank.clone()  # ... ending in blank; the empty prefix is all blanks
        self.score, self.last = torch.zeros_like(self.r_b[:, 0]), torch.full_like(self.r_b[:, 0], -1, dtype=torch.long)

    def extend(self, tokens):
        """Scores psi (B, K) of the prefix extended by each of tokens (B, K): log sum_t exp(phi_{t-1}) p_t(token), phi the
        paths that a new token may follow (after a repeat of the last token, only those ending in blank). No recurrence:
        every token's sum at once, one product over frames in the probability domain, scaled by the top phi (a sum below
        1e-300 of it counts as 1e-300). For EOS, the score of ending now: log P(the audio reads exactly this prefix)."""
        phis = torch.cat([torch.logaddexp(self.r_n, self.r_b), self.r_b], 2)[:, :-1]  # (B, T - 1, 2): new token; repeat
        top = phis.amax(1, keepdim=True)
        sums = ((phis - top).exp().mT @ self.probs[:, 1:]).clamp(min=1e-300).log() + top.mT  # (B, 2, V)
        new, repeat = sums.gather(2, tokens[:, None].expand(-1, 2, -1)).unbind(1)
        start = torch.where(self.last < 0, self.log_probs[:, 0].gather(1, tokens), self.NEG)  # after the empty prefix
        psi = torch.logaddexp(start, torch.where(tokens == self.last, repeat, new))
        return torch.where(tokens == EOS, torch.logaddexp(self.r_n[:, -1], self.r_b[:, -1]), psi)

    def choose(self, parent, tokens, psi):
        """Row i continues row parent[i] (B,), extended by tokens (B, 1) of score psi (B, 1): only the chosen prefixes
        solve the recurrences over frames, not every candidate that extend() scored."""
        if len(parent) < len(self.r_n):  # decode() dropped finished utterances: their rows' audio goes too
            self.log_probs, self.cum_blank, self.probs = self.log_probs[parent], self.cum_blank[parent], self.probs[parent]
        self.r_n, self.r_b, self.last = self.r_n[parent], self.r_b[parent], self.last[parent]
        log_p = self.log_probs.gather(2, tokens[:, None].expand(-1, self.log_probs.shape[1], -1))  # (B, T, 1)
        phi = torch.where((tokens == self.last)[:, None], self.r_b, torch.logaddexp(self.r_n, self.r_b))
        start, cum = torch.where(self.last < 0, log_p[:, 0], self.NEG), log_p.cumsum(1)
        self.r_n = cum + torch.logcumsumexp(torch.cat([(start - cum[:, 0])[:, None], phi[:, :-1] - cum[:, :-1]], 1), 1)
        self.r_b = self.cum_blank + torch.logcumsumexp(
            torch.cat([torch.full_like(start, self.NEG)[:, None], self.r_n[:, :-1] - self.cum_blank[:, :-1]], 1), 1)
        self.score, self.last = psi, tokens

class CharLM:
    """A character n-gram (order LM_ORDER) of the texts the tokenizer can spell, added by decode() with its weight (README)."""
    def __init__(self, texts, tokenizer, weight):
        self.texts, self.weight, self.vocab = [t for t in map(str, texts) if tokenizer.known(t) == t], weight, len(tokenizer)
        ids = np.concatenate([[BOS] * (LM_ORDER - 1) + tokenizer.encode(t) + [EOS] for t in self.texts])
        at = np.flatnonzero(ids != BOS)  # every token is predicted from the LM_ORDER - 1 before it (BOS-padded)
        # each token and its context as one integer, base vocab, the token last: mod vocab^(k + 1), its order k + 1 key
        order = min(LM_ORDER, int(63 / math.log2(self.vocab)))  # a key must fit in int64: a big vocabulary gets fewer orders
        keys, counts = np.unique(sum(ids[at - k] * self.vocab ** k for k in range(order)), return_counts=True)
        self.orders = []  # per order: sorted n-gram keys, counts; sorted contexts, their first n-gram, totals, next tokens
        for k in range(order):
            keys_k, inverse = np.unique(keys % self.vocab ** (k + 1), return_inverse=True)
            counts_k = np.bincount(inverse, counts)
            contexts, first, distinct = np.unique(keys_k // self.vocab, return_index=True, return_counts=True)
            self.orders.append((keys_k, counts_k, contexts, first, np.add.reduceat(counts_k, first), distinct))

    def probs(self, contexts, tokens):
        """P(tokens (N, K) | contexts (N, C) of token ids, each read by its last len(orders) - 1), (N, K) float64: each
        order interpolated with the one below by its count and its number of distinct next tokens; below order 1, uniform
        over EOS and letters. All rows at once: per order, a lookup of each row's context, whose next tokens follow its first."""
        n, every = len(tokens), np.arange(self.vocab)
        p, context = np.tile((every > BOS) / (self.vocab - 2), (n, 1)), np.zeros(n, dtype=np.int64)  # (N, vocab)
        for k, (keys, counts, contexts_k, first, totals, distinct) in enumerate(self.orders[:contexts.shape[1] + 1]):
            context = context + contexts[:, -k] * self.vocab ** (k - 1) if k else context
            seen = contexts_k[i := np.searchsorted(contexts_k, context).clip(max=len(contexts_k) - 1)] == context
            row, offset = np.nonzero(every < np.where(seen, distinct[i], 0)[:, None])  # its n-grams: side by side, sorted
            found = np.bincount(row * self.vocab + keys[j := first[i][row] + offset] % self.vocab, counts[j], n * self.vocab)
            p = np.where(seen[:, None], (found.reshape(n, -1) + distinct[i, None] * p) / (totals[i] + distinct[i])[:, None], p)
        return np.take_along_axis(p, tokens, 1)

@torch.no_grad()
def decode(model, batch, ctc_weight=0.3, beam=1, candidates=CANDIDATES, encoded=None):
    """KV-cached beam search -> token-id lists (no BOS, EOS); beam=1 is greedy. Hypotheses grow by their top candidates,
    scored (1 - w) log p_attention + w * (CTC prefix score gain) + model.lm's weighted log P (if any), until EOS or the
    length cap; best score per token wins. An utterance leaves the batch when its live ones trail its best ended by END_MARGIN."""
    model.eval()
    audio, valid = model.encoder(batch) if encoded is None else encoded  # evaluate() has encoded it already
    n, width = len(audio), beam  # row = utterance * beam + slot; cross-attention reads its utterance's audio once
    caches, limit = [{} for _ in model.decoder.blocks], max_tokens_for(batch["frames"]).to(audio.device)[:, None]  # (n, 1)
    ids, use_ctc = torch.arange(n, device=audio.device), model.ctc_head is not None and ctc_weight > 0
    ctc = CTCPrefixScorer(model.ctc_head(audio).float().log_softmax(-1), valid, width) if use_ctc else None
    scores = torch.tensor([0.0] + [float("-inf")] * (width - 1), device=audio.device).repeat(n, 1)  # BOS, live in slot 0
    token = torch.full((n * width, 1), BOS, device=audio.device)
    history = torch.zeros(n * width, 0, dtype=torch.long, device=audio.device)
    ended = [[] for _ in range(n)]  # per utterance: (score per token, tokens) of each ended hypothesis
    best_ended = torch.full((n,), float("-inf"), dtype=torch.float64, device=audio.device)  # total score
    for position in range(int(limit.max())):
        log_p = model.decoder(token, audio, valid, caches, offset=position)[:, -1].float().log_softmax(-1)
        log_p[:, [PAD, BOS]] = float("-inf")
        step = (top := log_p.topk(min(max(candidates, width), log_p.shape[-1]), -1)).values
        if use_ctc:
            psi = ctc.extend(top.indices)
            step = (1 - ctc_weight) * step + ctc_weight * (psi - ctc.score)
        if model.lm is not None:
            lm = model.lm.probs(F.pad(history, (LM_ORDER - 1, 0), value=BOS).cpu().numpy(), top.indices.cpu().numpy())
            step = step + model.lm.weight * torch.from_numpy(lm).to(step.device).log()
        best = (scores.view(-1, 1) + step).view(n, -1).topk(width, -1)  # over every slot's candidates
        parent = (best.indices // top.indices.shape[1] + torch.arange(n, device=audio.device)[:, None] * width).flatten()
        choice = (best.indices % top.indices.shape[1]).view(-1, 1)
        token = top.indices[parent].gather(1, choice)
        history = torch.cat([history[parent], token], 1)
        finished = ((token.view(n, width) == EOS) | (position + 1 >= limit)) & (best.values > float("-inf"))
        for i, slot in finished.nonzero().tolist():
            ended[ids[i]].append((best.values[i, slot].item() / (position + 1), history[i * width + slot].tolist()))
        best_ended = torch.maximum(best_ended, best.values.masked_fill(~finished, float("-inf")).amax(1))
        scores = best.values.masked_fill(finished, float("-inf"))
        scores = scores.masked_fill((scores.amax(1) < best_ended - END_MARGIN)[:, None], float("-inf"))
        if not (live := scores.amax(1) > float("-inf")).any():
            break
        if not live.all():  # finished utterances leave (ids: the live ones' batch places); rows follow their parents below
            rows, n = live.repeat_interleave(width), int(live.sum())
            parent, choice, token, history = parent[rows], choice[rows], token[rows], history[rows]
            audio, valid, limit, scores, best_ended, ids = (x[live] for x in (audio, valid, limit, scores, best_ended, ids))
        for cache in caches:  # self-attention keys/values follow their hypotheses, cross-attention ones their utterance
            cache["self"] = {key: value[parent] for key, value in cache["self"].items()}
            cache["cross"] = {key: value[live] for key, value in cache["cross"].items()} if len(live) > n else cache["cross"]
        if use_ctc:
            ctc.choose(parent, token, psi[parent].gather(1, choice))
    return [seq[:seq.index(EOS)] if EOS in seq else seq for _, seq in map(max, ended)]  # best score per token

TONED = re.compile(r"[a-z]+[1-5]( [a-z]+[1-5])*")  # a pinyin transcript: every syllable ends in its tone digit
TONE_METRICS = ("ser", "ter", "toned_ser")  # syllable error rate without tones, tone error rate, with tones

def tone_scores(refs, hyps):
    """Pinyin references and hypotheses -> ser: syllable error rate with the tones stripped; ter: among the reference
    syllables that the alignment of base syllables (jiwer's Levenshtein) pairs with an equal one, the share whose tone
    differs; toned_ser: syllable error rate of the syllables with their tones."""
    base = lambda text: " ".join(s.rstrip("12345") for s in text.split())
    aligned, matched, wrong = jiwer.process_words([base(r) for r in refs], [base(h) for h in hyps]), 0, 0
    for ref, hyp, chunks in zip(refs, hyps, aligned.alignments):
        for c in (c for c in chunks if c.type == "equal"):
            pairs = zip(ref.split()[c.ref_start_idx:c.ref_end_idx], hyp.split()[c.hyp_start_idx:c.hyp_end_idx])
            matched, wrong = matched + c.ref_end_idx - c.ref_start_idx, wrong + sum(r[-1] != h[-1] for r, h in pairs)
    return {"ser": aligned.wer, "ter": wrong / max(1, matched), "toned_ser": jiwer.wer(refs, hyps)}

@torch.no_grad()
def evaluate(model, dataset, tokenizer, device, n_utts=None, ctc_weight=0.3, beam=1):
    """Decoded WER/CER (and tone metrics on pinyin) of the first n_utts; teacher-forced loss and token accuracy."""
    model.eval()
    lengths = dataset.select(range(len(dataset) if n_utts is None else min(n_utts, len(dataset))))["n_frames"]
    refs, hyps, loss_sum, correct, tokens_total, decode_seconds = [], [], 0.0, 0, 0, 0.0
    for indices in length_batches(lengths, EVAL_BATCH_FRAMES):
        items = rows(dataset, indices)
        # references keep every character; the teacher-forced loss can only score the ones the tokenizer knows
        batch = to_device(collate([it | {"text": tokenizer.known(it["text"])} for it in items], tokenizer), device)
        t0, (audio, valid) = time.time(), model.encoder(batch)
        hyps += [tokenizer.decode(h) for h in decode(model, batch, ctc_weight, beam, encoded=(audio, valid))]
        decode_seconds += time.time() - t0  # transcription time = encoding + decoding
        logits, targets = model.decoder(batch["tokens"][:, :-1], audio, valid).float(), batch["tokens"][:, 1:]
        keep = targets != PAD
        loss_sum += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        correct, tokens_total = correct + (logits.argmax(-1) == targets)[keep].sum().item(), tokens_total + keep.sum().item()
        refs += [str(it["text"]) for it in items]
    tones = tone_scores(refs, hyps) if all(TONED.fullmatch(r) for r in refs) else {}
    return tones | {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps), "loss": loss_sum / max(1, tokens_total),
                    "token_accuracy": correct / max(1, tokens_total), "samples": list(zip(refs, hyps)), "utterances": len(refs),
                    "rtfx": sum(lengths) / 100 / max(decode_seconds, 1e-9)}

def save_checkpoint(path, state):
    """Write a temporary file, fsync, keep the previous checkpoint as .prev, rename: a crash never leaves half a one."""
    path, tmp = Path(path), Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, f"{path}.prev")
    os.replace(tmp, path)

def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"echo: {path}: unreadable checkpoint ({type(e).__name__}); the previous one, if any, "
                         f"is {path}.prev") from None
    return ckpt | ({"model_config": {"mlp": 4} | ckpt["model_config"]} if "model_config" in ckpt else {})  # before --mlp: 4x

def load_model(path, device):
    """A checkpoint -> (model in eval mode, tokenizer, the run's flags as a dict)."""
    ckpt = load_checkpoint(path)
    model, tokenizer = Echo(ModelConfig(**ckpt["model_config"])), Tokenizer(ckpt["tokenizer"])
    averaged = {k.removeprefix("module."): v for k, v in ckpt.get("averaged", {}).items() if k != "n_averaged"}
    model.load_state_dict(averaged or ckpt["model"])  # --ema's average: the weights validation and the test splits decoded
    model.lm = CharLM(ckpt["lm_text"], tokenizer, ckpt["config"]["lm_weight"]) if ckpt.get("lm_text") else None
    return model.to(device).eval(), tokenizer, ckpt["config"]

def transcribe(args):
    """Print '<path>\\t<transcript>' per file in input order (empty for silent or all-unvoiced audio, as other
    recognisers do); one-line errors on stderr; exit 1 if any failed."""
    model, tokenizer, config = load_model(args.ckpt, device := pick_device(args.device))
    waves, failed = {}, 0  # (path, piece number) -> audio; audio longer than --max_seconds is cut in pieces
    for path in args.transcribe:
        try:
            wave, piece = decode_audio(path), int(args.max_seconds * SAMPLE_RATE)
            for i, start in enumerate(range(0, len(wave), piece)):
                if i == 0 or len(wave) - start >= 4 * HOP:
                    waves[path, i] = wave[start:start + piece]
        except (BadInput, OSError) as e:
            print(f"echo: {path}: {e}", file=sys.stderr)
            failed += 1
    keys, texts = list(waves), {}
    pieces = [piece | {"text": ""} for piece in featurize(list(waves.values()), "waveform" in model.config.streams, device)]
    for indices in length_batches([len(piece["mel"]) for piece in pieces], EVAL_BATCH_FRAMES):
        hyps = decode(model, to_device(collate([pieces[i] for i in indices]), device), config["decode_ctc_weight"], args.beam)
        texts |= {keys[i]: tokenizer.decode(h) if pieces[i]["voiced"].any() else "" for i, h in zip(indices, hyps)}
    for path in (path for path in args.transcribe if (path, 0) in texts):
        print(f"{path}\t" + " ".join(texts[key] for key in keys if key[0] == path and texts[key]))
    return 1 if failed else 0

# ---- diagnostics: what pitch does inside the model, as TensorBoard scalars and figures (and PNGs, --diagnose)
def record_activations(model):
    """Read-only forward hooks storing each block's mean gate and mean |MLP output| -> (that dict, the hook handles)."""
    stats = {}
    store = lambda tag: lambda module, inputs, output: stats.__setitem__(tag, output.detach().float().abs().mean().item())
    return stats, [module.register_forward_hook(store(f"blocks/{name}/{what}")) for name, block in model.named_blocks()
                   for what, module in (("mlp_abs_mean", block.mlp), ("gate_mean", block.gate)) if module is not None]

def block_scalars(model, activations, hooks=()):
    """{tag: value} after a backward pass, as README's What TensorBoard shows lists them; removes the hooks."""
    for hook in hooks:
        hook.remove()
    def norm(module):
        grads = [p.grad.float().norm() for p in module.parameters() if p.grad is not None]
        return torch.stack(grads).norm().item() if grads else 0.0
    out = dict(activations)
    for name, block in model.named_blocks():
        if block.gate is not None:
            out[f"blocks/{name}/gate_over_mlp"] = activations[f"blocks/{name}/gate_mean"] / max(
                activations[f"blocks/{name}/mlp_abs_mean"], 1e-12)
            out[f"blocks/{name}/gate_over_mlp_grad_norm"] = norm(block.gate) / max(norm(block.mlp), 1e-12)
        out |= {f"grad/{name}.{kind}/{p}": norm(getattr(attention, p)) for kind, attention in
                (("self", block.attn), ("cross", block.cross)) if attention is not None for p in "qkvo"}
    pitch, streams = model.encoder.pitch, model.encoder.streams
    per_head = {"radius_alpha": None if pitch.radius_strength is None else
                0.5 * math.log(RADIUS_MAX) * torch.tanh(pitch.radius_strength),
                "bias_lambda_per_octave": None if pitch.pitch_bias is None else F.softplus(pitch.pitch_bias),
                "zero_value_offset": pitch.zero_value}
    out |= {f"pitch/{name}/head{h}": v for name, values in per_head.items() if values is not None
            for h, v in enumerate(values.tolist())}
    return out | dict(zip([f"streams/c_gate_{name}" for name in streams.names], streams.weights.tolist()
                          if streams.weights is not None else []))

def render(fig):
    """A matplotlib figure -> (H, W, 3) uint8 RGB array, figure closed."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image

def pitch_figure(mel, f0, voiced):
    """The log-mel (frames, 80) with the f0 track and the unvoiced frames on one time axis."""
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100, layout="tight")
    ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma", extent=(0, len(mel) / 100, 0, N_MELS))
    ax.set(xlabel="seconds", ylabel="mel bin", title="log-mel with the f0 track (white: voiced)")
    (hz := ax.twinx()).plot(np.arange(len(mel)) / 100, np.where(voiced > 0, f0, np.nan), color="white", lw=1.5)
    hz.plot(np.arange(len(mel)) / 100, np.where(voiced > 0, np.nan, F0_MIN), color="tab:cyan", lw=3, label="unvoiced")
    hz.set(ylim=(F0_MIN - 10, F0_MAX), ylabel="f0 (Hz)")
    hz.legend(loc="upper right", fontsize=7)
    return render(fig)

def rotary_figures(pitch, log_f0, voiced):
    """How encoder positions see each other under standard RoPE, f0-modulated RoPE and f0 + radii (the model's
    head-0 radius strength, or 1), and the first 4 rotary dimensions of the first two: two RGB arrays."""
    strength, head_dim = 1.0 if pitch.radius_strength is None else pitch.radius_strength[0].item(), 2 * len(pitch.freqs)
    variants = {"standard RoPE": PitchPrior(head_dim, 1), "f0-modulated": PitchPrior(head_dim, 1, f0_theta=True),
                f"f0 + radii (strength {strength:.2f})": PitchPrior(head_dim, 1, f0_theta=True, radii=True)}
    list(variants.values())[-1].radius_strength.data.fill_(strength)
    (fig, axes), tables = plt.subplots(1, 3, figsize=(12, 4), dpi=100), {}
    for ax, (label, prior) in zip(axes, variants.items()):
        prior.freqs = pitch.freqs.cpu()
        table = prior(log_f0, voiced, torch.ones_like(voiced))[0][0, 0]  # figures() runs without autograd
        tables[label] = cos, sin = table.real.numpy(), table.imag.numpy()
        # Re sum_k z_t conj(z_s) / K: cosine similarity of the rotary vectors, times r_t r_s with radii
        image = ax.imshow((cos @ cos.T + sin @ sin.T) / cos.shape[-1], cmap="RdBu_r", vmin=-1.5, vmax=1.5, origin="lower")
        ax.set(title=label, xlabel="key frame (40 ms)", ylabel="query frame")
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle("how positions see each other")
    similarity, (fig, ax) = render(fig), plt.subplots(figsize=(8, 3), dpi=100, layout="tight")
    for dim in range(4):
        for label, lw in (("standard RoPE", 2.5), ("f0-modulated", 1.0)):
            ax.plot(tables[label][dim % 2][:, dim // 2], lw=lw, color=f"C{dim // 2}", ls="-" if dim % 2 == 0 else "--")
    ax.set(xlabel="encoder frame (40 ms)", ylabel="rotary component",
           title="first 4 rotary dims: thick standard, thin f0-modulated; solid even, dashed odd")
    return similarity, render(fig)

def attention_figure(model, batch, frames):
    """Head-averaged encoder self-attention and decoder cross-attention of every layer for the first utterance."""
    attentions = [("encoder", i, block.attn) for i, block in enumerate(model.encoder.blocks)]
    attentions += [("decoder cross", i, block.cross) for i, block in enumerate(model.decoder.blocks)]
    for _, _, attention in attentions:
        attention.keep_weights = True
    model({key: value[:1] for key, value in batch.items()})  # its loss, computed in either mode: no dropout, no batch norm
    fig, axes = plt.subplots(1, len(attentions), figsize=(2.2 * len(attentions), 2.8), squeeze=False, layout="tight")
    for ax, (kind, i, attention) in zip(axes[0], attentions):
        ax.imshow(attention.weights[0].float().cpu().numpy()[:, :frames], aspect="auto", origin="lower", cmap="viridis")
        ax.set(xlabel="audio frame", ylabel="token" if kind != "encoder" else "frame", title=f"{kind} {i}")
        attention.keep_weights, attention.weights = False, None
    fig.suptitle("attention, head average")
    return render(fig)

def first_validation_batch(data, tokenizer, device):
    """The first validation utterance as a batch with tokens (of the characters the tokenizer knows)."""
    item = rows(data["validation"], [0])[0]
    return to_device(collate([item | {"text": tokenizer.known(item["text"])}], tokenizer), device)

@torch.no_grad()
def figures(model, batch):
    """The diagnostic figures, {tag: RGB array}, for the first utterance of a collated batch (with tokens)."""
    n, frames = int(batch["frames"][0]), (int(batch["frames"][0]) + 3) // 4
    mel, f0, voiced = (batch[key][0, :n].float().cpu().numpy() for key in ("mel", "f0", "voiced"))
    track = pitch_track(batch["f0"][:1].cpu(), batch["voiced"][:1].cpu(), batch["frames"][:1].cpu(), frames)
    similarity, curves = rotary_figures(model.encoder.pitch, *track)
    return {"pitch_vs_spectrogram": pitch_figure(mel, f0, voiced), "rotary_similarity": similarity,
            "rope_curves": curves, "attention": attention_figure(model, batch, frames)}

def diagnose(args):
    """--diagnose CKPT AUDIO: the diagnostic figures of a trained model for one audio file, as PNGs in runs/<name>/."""
    model, tokenizer, config = load_model(args.diagnose[0], device := pick_device(args.device))
    try:
        features = featurize([decode_audio(args.diagnose[1])], "waveform" in model.config.streams)[0]
    except (BadInput, OSError) as e:
        raise SystemExit(f"echo: {args.diagnose[1]}: {e}") from None
    batch = to_device(collate([features | {"text": ""}]), device)
    text = tokenizer.decode(decode(model, batch, config["decode_ctc_weight"], args.beam)[0])
    batch = to_device(collate([features | {"text": text}], tokenizer), device)  # attention maps over its own transcript
    (out := Path(args.runs_dir) / args.name).mkdir(parents=True, exist_ok=True)
    for tag, image in figures(model, batch).items():
        plt.imsave(out / f"{tag}.png", image)
        print(out / f"{tag}.png")
    print(f"transcript: {text}")

# ---- training
def lr_at(step, args):
    """Linear warmup, then cosine decay to --lr_floor of the peak."""
    progress, floor = min(1.0, max(0, step - args.warmup) / max(1, args.max_steps - args.warmup)), args.lr_floor
    return args.lr * min((step + 1) / max(1, args.warmup), floor + (1 - floor) / 2 * (1 + math.cos(math.pi * progress)))

def budgeted_steps(args, step, stats, started, world, device):
    """--time_budget at step BUDGET_AT -> of --max_steps, the steps that fit its minutes from started (time.time()), later
    steps taking BUDGET_SLOWDOWN times the pace since stats["paced"] (step, time), less BUDGET_RESERVE steps' time for evaluating
    and decoding; every process gets the smallest count (NCCL reduces CUDA tensors only). README, Time budget."""
    pace = BUDGET_SLOWDOWN * (time.time() - stats["paced"][1]) / (step - stats["paced"][0])  # a later step's seconds
    fit = torch.tensor(step + int((60 * args.time_budget - time.time() + started) / pace), device=device)
    if world > 1:
        torch.distributed.all_reduce(fit, torch.distributed.ReduceOp.MIN)
    steps = max(step, min(args.max_steps, int(fit) - BUDGET_RESERVE))
    tqdm.write(f"--time_budget {args.time_budget:g} min: {steps} steps, at {pace:.3f} s a step expected")
    return steps

def environment(device, world):
    """Code version (git commit, if any, + hash of this file), software and hardware, kept with every run."""
    git = shutil.which("git") and subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                                 cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"code": f"{git or 'no-git'}+{CODE_HASH}", "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "processes": world,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none"}

def training_state(model, averaged, optimizer, position, config, tokenizer, env):
    """What a training checkpoint holds (restore() reads it back); position is (step, epoch, batch_index)."""
    return {"model": model.state_dict(), "averaged": averaged.state_dict(), "model_config": dataclasses.asdict(model.config),
            "optimizer": optimizer.state_dict(), **dict(zip(("step", "epoch", "batch_index"), position)),
            "config": config, "tokenizer": tokenizer.chars, "lm_text": model.lm and model.lm.texts, "code": env["code"],
            "source": SOURCE.decode(), "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}}

def restore(path, ckpt, model, averaged, optimizer):
    """Load a training checkpoint's model (built with these flags), average, optimizer and RNG -> (step, epoch, batch_index)."""
    if changed := [f"{k}={v}" for k, v in ckpt["model_config"].items() if v != getattr(model.config, k)]:
        raise SystemExit(f"echo: {path}: its model has {', '.join(changed)}, unlike these flags: resume with its model's flags")
    for state, key in ((model, "model"), (averaged, "averaged"), (optimizer, "optimizer")):
        state.load_state_dict(ckpt[key])
    random.setstate(ckpt["rng"]["python"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["step"], ckpt["epoch"], ckpt["batch_index"]

@contextlib.contextmanager
def deferred_signals():
    """Inside, SIGINT and SIGTERM only append to the yielded list: training finishes its step, saves, exits."""
    received, on_main_thread = [], threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)} if on_main_thread else {}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

def init_distributed(device_flag):
    """Under torchrun, join the process group (NCCL on GPU, gloo on CPU) -> (rank, world size, device)."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), pick_device(device_flag)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device := torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device

def training_data(args, rank, world, ckpt):
    """-> the featurised splits, this process's train set, the tokenizer (the checkpoint's when resuming) and the
    skipped utterances. Rank 0 builds the corpus and the feature cache while the others wait."""
    if rank > 0:
        torch.distributed.barrier()
    data, skipped = load_splits(args)
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    if args.streaming:  # the stream is not read ahead: letters, apostrophe, space and the held-out text's characters
        tokenizer = Tokenizer(ckpt["tokenizer"] if ckpt else string.ascii_lowercase + "' " + "".join(data["validation"]["text"]))
        return data, split_dataset_by_node(data["train"], rank, world), tokenizer, skipped
    tokenizer = Tokenizer(ckpt["tokenizer"] if ckpt else "".join(data["train"]["text"]))
    known = [set(t) <= set(tokenizer.chars) for t in data["train"]["text"]]
    skipped += [f"train utterance {i}: characters outside the tokenizer" for i, ok in enumerate(known) if not ok]
    return data, data["train"].select([i for i, ok in enumerate(known) if ok]), tokenizer, skipped

def training_batches(train_set, tokenizer, args, rank, world, epoch, batch_index, device):
    """Yields (epoch, batch_index after the step, this process's micro-batches) for each optimizer step from the data
    position on, epoch after epoch. Cached splits: the next --grad_accum batches of the epoch's seeded order, shared
    out among the processes. --streaming: each process reads its part of the stream; a resumed run restarts its epoch."""
    per_step, pin = args.grad_accum // world, device.type == "cuda"
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    while True:
        if args.streaming:
            loader = iter(torch.utils.data.DataLoader(StreamingBatches(train_set, tokenizer, args, epoch),
                                                      batch_size=None, num_workers=workers, pin_memory=pin))
            steps = iter(lambda: list(itertools.islice(loader, per_step)), [])
        else:
            rng, lengths = random.Random(args.seed * 100003 + epoch), list(train_set["n_frames"])  # the same on resuming
            batches = length_batches(lengths, args.batch_frames, rng)  # this epoch's order; b[-1] is batch b's longest
            batches = sorted(batches, key=lambda b: lengths[b[-1]]) if args.sortagrad and epoch == 0 else batches
            shares = [batches[start:start + args.grad_accum][rank::world]  # this process's share of each step
                      for start in range(batch_index, len(batches) - args.grad_accum + 1, args.grad_accum)]
            loader = iter(torch.utils.data.DataLoader(
                [micro for share in shares for micro in share], batch_size=None, num_workers=workers,
                collate_fn=functools.partial(cached_batch, train_set, tokenizer, args, epoch), pin_memory=pin))
            steps = ([next(loader) for _ in share] for share in shares)
        for micro_batches in steps:
            if len(micro_batches) == per_step:
                batch_index += args.grad_accum
                yield epoch, batch_index, micro_batches
        epoch, batch_index = epoch + 1, 0

def open_run(run_dir, config, env, model, train_set, tokenizer, skipped, step):
    """Rank 0's start of a run: the header lines, runs/<name>/ with config.json and the exact echo.py that runs,
    and the TensorBoard writer (a resumed run drops what was logged after its checkpoint)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    size = "streamed" if config["streaming"] else f"{len(train_set)} ({sum(train_set['n_frames']) / 360000:.2f} h)"
    print(f"echo {env['code']} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters | train "
          f"utterances {size} | vocab {len(tokenizer)} | {env['processes']} x {env['device']} | {env['platform']}")
    print(f"config: {json.dumps(config)}")
    if skipped:
        print(f"skipped {len(skipped)} unusable utterances, e.g. {skipped[0]}")
    (run_dir / "config.json").write_text(json.dumps({"config": config, "environment": env}, indent=1))
    (run_dir / "echo.py").write_bytes(SOURCE)
    writer = SummaryWriter(run_dir, purge_step=step + 1 if step else None)
    for tag, value in (("config", config), ("environment", env)):
        writer.add_text(tag, f"```\n{json.dumps(value, indent=1)}\n```", step)
    writer.add_scalar("data/skipped_utterances", len(skipped), step)
    return writer

def log_step(writer, step, args, losses, grad_norm, step_seconds, diagnostics, stats):
    """TensorBoard scalars of one optimizer step (the loss every step, the rest every 10), and, when stdout is not
    a terminal (batch jobs, nohup, CI), a plain progress line every --log_every steps."""
    elapsed, scalars = time.time() - stats["start"], {"train/loss": losses[0]} | diagnostics
    if step % 10 == 0 or step == 1:
        scalars |= {"train/skipped_nonfinite_steps": stats["nonfinite_steps"], "train/cross_entropy": losses[1],
                    "train/ctc_loss": losses[2], "train/lr": lr_at(step - 1, args), "train/grad_norm": grad_norm,
                    "train/step_seconds": step_seconds, "train/audio_seconds_per_second": stats["audio_seconds"] / elapsed}
        scalars |= {"data/skipped_in_stream": stats["skipped_in_stream"]} if args.streaming else {}
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    if not sys.stdout.isatty() and (step % args.log_every == 0 or step == args.max_steps):
        print(f"step {step}/{args.max_steps} | loss {losses[0]:.4f} | lr {lr_at(step - 1, args):.2e} | "
              f"{stats['audio_seconds'] / elapsed:.0f} audio-s/s | elapsed {elapsed / 60:.1f} min | {args.name}", flush=True)

def evaluate_and_log(writer, step, split, model, dataset, tokenizer, device, args, beam, n_utts=None):
    """Decode a split's first n_utts with this beam (validation: greedy, cheaper), log the metrics and 5 samples, print."""
    result = evaluate(model, dataset, tokenizer, device, n_utts, args.decode_ctc_weight, beam)
    for key in [key for key in ("wer", "cer", *TONE_METRICS, "loss", "token_accuracy") if key in result]:
        writer.add_scalar(f"{split}/{key}{'_teacher_forced' if key == 'token_accuracy' else ''}", result[key], step)
    writer.add_text(f"{split}/samples", "\n\n".join(f"ref: {r}  \nhyp: {h}" for r, h in result["samples"][:5]), step)
    tones = "".join(f"  {key.upper()} {100 * result[key]:.2f} %" for key in TONE_METRICS if key in result)
    tqdm.write(f"step {step}, {split}: CER {100 * result['cer']:.2f} %  WER {100 * result['wer']:.2f} %{tones}  loss "
               f"{result['loss']:.3f}  ({result['utterances']} utterances, decoded, beam {beam}, RTFx "
               f"{result['rtfx']:.0f}) | {args.name}")
    return result

def test_and_report(writer, step, model, data, tokenizer, device, args, config, stats, skipped):
    """After training: decode the test splits, log them with the flags to HParams, write results.json."""
    results = {"train_minutes": round((time.time() - stats["start"]) / 60, 2),
               "parameters": sum(p.numel() for p in model.parameters()), "skipped_nonfinite_steps": stats["nonfinite_steps"],
               "skipped_utterances": len(skipped) + stats["skipped_in_stream"], "steps": step}
    for split in [split for split in TEST_SPLITS if split in data]:
        result = evaluate_and_log(writer, step, split, model, data[split], tokenizer, device, args, args.beam, args.test_utts)
        results[split] = {k: round(result[k], 4) for k in ("wer", "cer", *TONE_METRICS, "rtfx", "utterances") if k in result}
    if results["skipped_utterances"]:
        print(f"skipped {results['skipped_utterances']} unusable utterances in all")
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
    writer.add_hparams(hparams, {f"hparam/{split}_{metric}": results[split][metric] for split in TEST_SPLITS
                                 if split in results for metric in ("cer", "wer", *TONE_METRICS)
                                 if metric in results[split]}, run_name=".", global_step=step)
    (Path(args.runs_dir) / args.name / "results.json").write_text(json.dumps(results, indent=1))
    writer.close()
    return results

def train(args):
    """Train, evaluate and checkpoint. Under torchrun each step's --grad_accum micro-batches are shared out among the
    processes (DDP averages their gradients); rank 0 alone logs, evaluates, checkpoints and returns the test results."""
    (rank, world, device), started = init_distributed(args.device), time.time()
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(args.seed)
    run_dir = Path(args.runs_dir) / args.name
    ckpt = load_checkpoint(run_dir / "ckpt.pt") if args.resume else None
    data, train_set, tokenizer, skipped = training_data(args, rank, world, ckpt)
    model = Echo(ModelConfig.from_args(args, len(tokenizer))).to(device)
    averaged = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema))
    tested = averaged.module  # what validation and the test splits decode: --ema's moving average of the weights
    if args.lm_weight and rank == 0 and not args.streaming:  # rank 0 alone decodes; a stream's text is not known ahead
        more = corpus_plan(args.corpus_size, args.corpus_seed, args.dataset, args.lm_sentences) if args.dataset in CORPORA else []
        model.lm = tested.lm = CharLM([*train_set["text"], *more], tokenizer, args.lm_weight)
    optimizer = build_optimizer(model, args, device)
    step, epoch, batch_index = restore(run_dir / "ckpt.pt", ckpt, model, averaged, optimizer) if ckpt else (0, 0, 0)
    args.max_steps = ckpt["config"]["max_steps"] if ckpt and args.time_budget else args.max_steps  # the steps it chose
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(wrapped, dynamic=True) if args.compile else wrapped
    config, env = {k: v for k, v in vars(args).items() if k not in ("resume", "transcribe", "ckpt")}, environment(device, world)
    writer = open_run(run_dir, config, env, model, train_set, tokenizer, skipped, step) if rank == 0 else None
    batches = training_batches(train_set, tokenizer, args, rank, world, epoch, batch_index, device)
    stats = {"start": time.time(), "paced": (step, time.time()), "audio_seconds": 0, "nonfinite_steps": 0, "skipped_in_stream": 0}
    with deferred_signals() as stop, tqdm(total=args.max_steps, initial=step, desc=args.name, file=sys.stdout,
                                          disable=rank or not sys.stdout.isatty()) as progress:
        for step in itertools.takewhile(lambda s: s <= args.max_steps, itertools.count(step + 1)):  # from 1; --time_budget
            (epoch, batch_index, micro_batches), t0 = next(batches), time.time()  # model never leaves training mode
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step - 1, args)
            recording = record_activations(model) if rank == 0 and args.diag_every > 0 and step % args.diag_every == 0 else None
            totals = torch.zeros(4)  # mean loss, cross-entropy, ctc; audio frames
            for i, batch in enumerate(micro_batches):
                stats["skipped_in_stream"] += batch.pop("skipped", 0)
                batch, n = to_device(batch, device), len(micro_batches)
                with contextlib.nullcontext() if world == 1 or i == n - 1 else wrapped.no_sync():  # all-reduce once
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        loss, ce, ctc = (wrapped if recording else forward)(batch)  # hooks need eager
                    (loss / n).backward()
                totals += torch.tensor([loss.item() / n, ce.item() / n, (0.0 if ctc is None else ctc.item()) / n,
                                        batch["frames"].sum().item()])
            if world > 1:
                torch.distributed.all_reduce(totals)
                totals[:3] /= world
            losses, stats["audio_seconds"] = totals[:3], stats["audio_seconds"] + totals[3].item() / 100
            diagnostics = block_scalars(model, *recording) if recording else {}  # before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if torch.isfinite(grad_norm) and torch.isfinite(losses).all():
                optimizer.step()
                averaged.update_parameters(model)  # --ema 0: a copy of the weights
            else:  # one bad batch must not poison the weights: skip it, count it, go on
                stats["nonfinite_steps"] += 1
                tqdm.write(f"step {step}: non-finite loss or gradient, step skipped ({stats['nonfinite_steps']} so far)")
            model.zero_grad(set_to_none=True)
            progress.update(1)
            progress.set_postfix(loss=f"{losses[0]:.3f}")
            stats["paced"] = (step, time.time()) if step == BUDGET_AT - 100 else stats["paced"]  # after warm-up, compiling
            if step == BUDGET_AT and args.time_budget:  # keep the steps that fit at this pace
                args.max_steps = config["max_steps"] = progress.total = budgeted_steps(args, step, stats, started, world, device)
            evaluating = step % args.eval_every == 0 or step == args.max_steps
            if rank == 0:
                log_step(writer, step, args, losses, grad_norm, time.time() - t0, diagnostics, stats)
                if evaluating:
                    evaluate_and_log(writer, step, "val", tested, data["validation"], tokenizer, device, args, 1, args.eval_utts)
                    images = figures(tested, first_validation_batch(data, tokenizer, device)) if args.diag_every else {}
                    for tag, image in images.items():
                        writer.add_image(f"diagnostics/{tag}", image, step, dataformats="HWC")
                if evaluating or stop:
                    state = training_state(model, averaged, optimizer, (step, epoch, batch_index), config, tokenizer, env)
                    save_checkpoint(run_dir / "ckpt.pt", state)
            if stop:
                if rank == 0:
                    writer.close()
                    print(f"echo: {signal.Signals(stop[0]).name} at step {step}: checkpoint saved to "
                          f"{run_dir / 'ckpt.pt'}; continue with --name {args.name} --resume")
                raise SystemExit(128 + stop[0])
    if world > 1:
        torch.distributed.destroy_process_group()
    return test_and_report(writer, step, tested, data, tokenizer, device, args, config, stats, skipped) if rank == 0 else None

# ---- experiments: ablation and benchmark
def ablation_run(run):
    """Results of one ablation run: trained, resumed from its checkpoint if it was interrupted, or read back if it
    finished. A different run already in its folder is an error, never overwritten."""
    if ((run_dir := Path(run.runs_dir) / run.name) / "config.json").exists():
        ignore = ("name", "runs_dir", "ablate", "seeds", "jobs", "resume", "transcribe", "ckpt")  # runs may move
        earlier, default = BEFORE_FLAGS | json.loads((run_dir / "config.json").read_text())["config"], build_parser().get_default
        if any(earlier.get(k, default(k)) != json.loads(json.dumps(v)) for k, v in vars(run).items() if k not in ignore):
            raise SystemExit(f"echo: {run_dir} holds a run with another config: pick another --name")
        if (run_dir / "results.json").exists():
            return json.loads((run_dir / "results.json").read_text())
    return train(argparse.Namespace(**vars(run) | {"resume": (run_dir / "ckpt.pt").exists()}))

def ablation_lane(runs, jobs):
    """One of --jobs processes: its runs one after another (ablation_run), on a 1/jobs share of the threads."""
    torch.set_num_threads(max(1, torch.get_num_threads() // jobs))
    return [ablation_run(run) for run in runs]

def scalar_history(run_dir, tag):
    """A run's TensorBoard scalar -> {step: last value logged at it} ({} if never logged; a resumed run logs again)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}

def seed_difference(values, reference):
    """Per-seed values of a configuration against its reference's -> 'difference (Welch's t-test p, difference in
    pooled sample standard deviations of the seeds)'; the difference alone with one seed or no spread."""
    d = values.mean() - reference.mean()  # with one seed there is no sample variance (numpy would warn and give nan)
    if min(len(values), len(reference)) < 2 or (pooled := math.sqrt((values.var(ddof=1) + reference.var(ddof=1)) / 2)) == 0:
        return f"{d:+.2f}"
    return f"{d:+.2f} (p {scipy.stats.ttest_ind(values, reference, equal_var=False).pvalue:.3f}, {d / pooled:+.1f} sd)"

def ablate(args):
    """Train ABLATIONS[args.ablate], args.seeds seeds each (in --jobs processes, each every --jobs-th run) -> runs/<name>/
    ablation.md (per corpus: decoded error rates, mean ± std, differences to the first, Welch's p) and ablation.png."""
    out, t0, results, curves, corpus_of = Path(args.runs_dir) / args.name, time.time(), {}, {}, {}  # out: made by its runs
    args.time_budget = 0  # comparable runs: the same steps on every machine
    runs = [argparse.Namespace(**(vars(args) | flags | {"seed": seed, "name": f"{args.name}/{label}-seed{seed}"}))
            for label, flags in ABLATIONS[args.ablate].items() for seed in range(args.seeds)]
    for run in {run.dataset: run for run in runs}.values() if args.jobs > 1 else ():
        load_splits(run)  # each corpus is built and featurised here, once: the processes only read the cache
    lanes = [runs[i::args.jobs] for i in range(args.jobs)]  # whole lanes, so that Ctrl-C leaves no run queued
    with concurrent.futures.ProcessPoolExecutor(args.jobs, multiprocessing.get_context("spawn")) as pool:
        done = (pool.map if args.jobs > 1 else map)(ablation_lane, lanes, [args.jobs] * args.jobs)
        outcomes = dict(zip([run.name for lane in lanes for run in lane], itertools.chain(*done)))
    for label, run in zip([label for label in ABLATIONS[args.ablate] for _ in range(args.seeds)], runs):
        corpus_of[label] = run.dataset
        results.setdefault(label, []).append(outcomes[run.name])
        curves.setdefault(label, []).append(scalar_history(Path(args.runs_dir) / run.name, "val/loss"))
    corpora, text = list(dict.fromkeys(corpus_of.values())), []
    fig, axes = plt.subplots(len(corpora), 2, figsize=(12, 3.5 * len(corpora)), width_ratios=(3, 2), squeeze=False)
    for (ax, curve_ax), corpus in zip(axes, corpora):
        labels = [label for label in results if corpus_of[label] == corpus]
        first = results[labels[0]][0]
        metrics = [(s, m) for s in TEST_SPLITS if s in first for m in ("cer", "wer", *TONE_METRICS) if m in first[s]]
        values = {label: {m: 100 * np.array([r[m[0]][m[1]] for r in results[label]]) for m in metrics} for label in labels}
        header = ["| configuration | " + " | ".join(f"{s} {m.upper()} %" for s, m in metrics) + " |",
                  "|---" * (len(metrics) + 1) + "|"]
        row = lambda label, cell: f"| {label.split('/')[-1]} | " + " | ".join(map(cell, metrics)) + " |"
        text += [f"### {corpus}", "", *header, *(row(label, lambda m: f"{v[m].mean():.2f} ± {v[m].std():.2f}")
                                                for label, v in values.items())]
        text += ["", f"Difference to {labels[0].split('/')[-1]}, in points: difference (Welch's t-test p, difference "
                 "in pooled sample standard deviations of the seeds)", "", *header]
        text += [row(label, lambda m: seed_difference(v[m], values[labels[0]][m])) for label, v in values.items()][1:] + [""]
        headline = "ter" if "ter" in first["test"] else "cer"
        for k, m in enumerate(bars := [(s, m) for s, m in metrics if m == headline]):
            ax.bar(np.arange(len(values)) + (k - (len(bars) - 1) / 2) * 0.8 / len(bars), [v[m].mean() for v in values.values()],
                   0.8 / len(bars), yerr=[v[m].std() for v in values.values()], capsize=3, label=m[0])
        ax.set_xticks(range(len(values)), [label.split("/")[-1] for label in values])
        ax.set(ylabel=f"{headline.upper()} % (decoded)", title=f"{corpus}: {args.seeds} seeds, mean ± std")
        ax.legend()
        for label in labels:
            steps = sorted(set.intersection(*(set(h) for h in curves[label])))
            curve_ax.plot(steps, [np.mean([h[s] for h in curves[label]]) for s in steps], marker="o", label=label)
        curve_ax.set(xlabel="step", ylabel="validation loss (teacher-forced)", title=f"mean of {args.seeds} seeds")
        curve_ax.legend(fontsize=7)
    text.append(f"{args.seeds} seeds each, mean ± std (population), {(time.time() - t0) / 60:.0f} min in all.\n")
    (out / "ablation.md").write_text("\n".join(text))
    fig.suptitle(f"Echo {args.ablate} ablation")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    print("\n".join(text))

def median_seconds(run, device, repeats=3):
    """Median seconds of run() over repeats after a warm-up (numba compiles pyin's kernels): CPU time on a CPU, so
    that other processes do not count; wall time after the queued work on a GPU."""
    now = (lambda: torch.cuda.synchronize() or time.perf_counter()) if device.type == "cuda" else time.process_time
    stamps = [now()] + [(run(), now())[1] for _ in range(repeats + 1)]  # the time after each call
    return float(np.median(np.diff(stamps)[1:]))

def time_train_steps(args, batches, variants, vocab, device, warmup=3):
    """Median train-step seconds and parameter count per variant ({label: ModelConfig overrides}) on the
    same batches, round-robin so that every variant sees the same machine load; warm-up steps not timed."""
    models, seconds = {}, {label: [] for label in variants}
    for label, flags in variants.items():
        torch.manual_seed(args.seed)
        model = Echo(dataclasses.replace(ModelConfig.from_args(args, vocab), **flags)).to(device).train()
        models[label] = (model, build_optimizer(model, args, device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        for label, (model, optimizer) in models.items():
            t0 = sync() or time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(batch)[0]
            loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
            sync()
            if i >= warmup:
                seconds[label].append(time.perf_counter() - t0)
    return {label: (float(np.median(s)), sum(p.numel() for p in models[label][0].parameters())) for label, s in seconds.items()}

def benchmark(args):
    """README's Speed, side by side, on this device; without --ckpt, an untrained model decodes (to the length cap)."""
    device, cpu, threads = pick_device(args.device), torch.device("cpu"), torch.get_num_threads()
    data, _ = load_splits(argparse.Namespace(**(vars(args) | {"streams": "spectrogram,pitch,waveform"})))
    tokenizer, frames = Tokenizer("".join(data["train"]["text"])), data["train"]["n_frames"]
    all_batches = length_batches(frames, args.batch_frames, random.Random(args.seed * 100003))
    batches = [collate(rows(data["train"], b), tokenizer) for b in all_batches[:23]]
    audio = sum(b["frames"].sum().item() for b in batches[3:]) / 100
    waves = [torch.from_numpy(np.array(w, dtype=np.float32)) for w in data["validation"][:20]["wave"]]
    audio_f0, padded = sum(map(len, waves)) / SAMPLE_RATE, nn.utils.rnn.pad_sequence(waves, batch_first=True).to(device)
    pyin = lambda: [librosa.pyin(w.numpy(), fmin=65, fmax=400, sr=SAMPLE_RATE, hop_length=HOP) for w in waves]
    torch.set_num_threads(1)  # more threads only add spin-waiting on these small tensors
    methods = {"f0: YIN in torch (extract_f0), one utterance at a time": (lambda: [extract_f0(w) for w in waves], cpu),
               f"f0: YIN in torch, {len(waves)} utterances batched on {device.type}": (lambda: yin_f0(padded), device),
               "f0: librosa.pyin 65-400 Hz": (pyin, cpu)}
    f0_seconds = {label: median_seconds(*method) for label, method in methods.items()}
    torch.set_num_threads(threads)
    print(f"device: {device} ({environment(device, 1)['gpu']}), {threads} threads, --batch_frames "
          f"{args.batch_frames}, 20 timed steps after 3 warm-up, defaults otherwise\n")
    variants = {f"attention, --gate none: {label}": ABLATIONS["pitch"][key] | {"gate": "none"} for label, key in
                 (("plain RoPE (--no-f0_theta)", "baseline"), ("f0_theta", "f0_theta"),
                  ("f0_theta + radii + pitch_bias + zero_value", "all"))}
    variants |= {f"--gate {gate}": {"gate": gate} for gate in ("mlp", "t", "m")}
    variants |= {f"--streams {s}": {"streams": s} for s in STREAMS}
    timings = time_train_steps(args, batches, variants, len(tokenizer), device)
    base = timings["attention, --gate none: plain RoPE (--no-f0_theta)"][0]
    print("| train step | ms | vs plain RoPE | audio-s/s | parameters |\n|---|---|---|---|---|")
    for label, (sec, params) in timings.items():
        print(f"| {label} | {1000 * sec:.0f} | {sec / base:.2f}x | {audio / 20 / sec:.0f} | {params / 1e6:.2f} M |")
    model = Echo(ModelConfig.from_args(args, len(tokenizer))).to(device)
    model(to_device(batches[0], device))[0].backward()
    print("\n| optimizer, default model | state | of AdamW's | optimizer.step() |\n|---|---|---|---|")
    for name in LEARNING_RATES:  # the same gradients each time; the weights move, which does not change the cost
        optimizer = build_optimizer(model, argparse.Namespace(**(vars(args) | {"optimizer": name})), device)
        seconds = median_seconds(optimizer.step, device)  # its first step makes the state
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        adamw = state if name == "adamw" else adamw
        print(f"| {name} | {state / 2**20:.3f} MiB | {state / adamw:.3f} | {1000 * seconds:.1f} ms |")
    print(f"\n| what | value |\n|---|---|\n| padding in length-bucketed batches | "
          f"{100 * (1 - sum(frames) / sum(max(frames[i] for i in b) * len(b) for b in all_batches)):.1f} % |")
    for label, seconds in f0_seconds.items():
        clock = "wall" if "batched" in label and device.type == "cuda" else "CPU"
        print(f"| {label} | {seconds / audio_f0:.4f} {clock}-s per audio-s |")
    model, tokenizer, config = load_model(args.ckpt, device) if args.ckpt else (model, tokenizer, vars(args))
    for weight, beam in ((0.0, 1), (config["decode_ctc_weight"], 1), (config["decode_ctc_weight"], config["beam"])):
        result = evaluate(model, data["validation"], tokenizer, device, 100, weight, beam)
        print(f"| decoding RTFx, KV cache, {'greedy' if beam == 1 else f'beam {beam}'}, "
              f"{'attention only' if weight == 0 else 'joint CTC/attention'}{'' if args.ckpt else ', untrained'} | "
              f"{result['rtfx']:.0f} (val CER {100 * result['cer']:.2f} %) |")
    batch = first_validation_batch(data, tokenizer, device)
    print(f"| diagnostics: the 4 figures, at each evaluation | {median_seconds(lambda: figures(model, batch), device):.2f} s |")
    activations, hooks = record_activations(model.train())
    model(batch)[0].backward()
    seconds = median_seconds(lambda: block_scalars(model, activations, hooks), device)
    print(f"| diagnostics: per-block scalars, every --diag_every steps | {1000 * seconds:.1f} ms |")

# ---- CLI
def main(argv=None):
    if (args := parse_args(argv)).transcribe:
        sys.exit(transcribe(args))
    (diagnose if args.diagnose else benchmark if args.bench else ablate if args.ablate else train)(args)

if __name__ == "__main__":
    main()
