"""data.py: everything between files on disk and (input_ids, labels, images) batches for LongVILA.

Follows LongVILA (Xue et al., arXiv 2408.10188) and the VILA reference data pipeline: LLaVA-style JSON samples,
`<video>` expanded to (N x IMAGE_TOKEN_ID, "\\n") x F, SigLIP preprocessing (bicubic resize, mean 0.5 std 0.5),
Llama-3 / Qwen2-ChatML chat templates, random windows of long text for context extension (stage 4), and the
long-video instruction-data builder of the paper's section 4 (segment captions -> LLM-written QA pairs).

    python data.py demo --out data/demo [--seed 0]          # synthetic data for the CPU demo of all five stages
    python data.py longvideo-sft --videos DIR --captioner CKPT --llm CKPT --out sft.json [--segment-s 10]
    python -m pytest -q tests/test_data.py

Public API (SPEC.md):
    Tokenizer.from_file(path) / .for_checkpoint(ckpt_dir) / .tiny(cache_dir=None, template="llama3")
        .encode(text) -> list[int] (special-token strings in text stay text), .decode(ids) -> str,
        .vocab_size, .eos_id (end of turn), .pad_id, .bos_id (None for ChatML), .eot_id, .eod_id (end of
        document, stage-4 separator), .template ("llama3" | "chatml"), .special_ids (set of control-token ids)
    build_conversation(conversations, tokenizer, num_frames, tokens_per_frame, system=None,
                       add_generation_prompt=None) -> (input_ids list[int], labels list[int])
    read_video(path, num_frames=None, fps=None) -> (frames uint8 np (F,H,W,3), frame_indices, timestamps_s)
    load_image(path) -> uint8 np (H,W,3)
    preprocess(frames uint8 (F,H,W,3), image_size) -> float32 torch (F,3,S,S)
    SupervisedDataset(files_with_weights, media_root, tokenizer, image_size, tokens_per_frame, num_frames,
                      max_len, fps=None, seed=0)   # stages 1, 2, 3, 5; item: {"id", "input_ids", "labels", "images"}
    TextWindowDataset(path, tokenizer, seq_len, seed)   # stage 4: .txt / .jsonl / .bin (uint32)
    SPSampler(dataset_len, dp_rank, dp_size, seed, start_step=0, batch_size=1)   # same sample on an SP group
    collate(items, pad_id) -> {"input_ids" (B,T), "labels" (B,T), "images": list[(F,3,S,S) | None], "ids"}
    IMAGE_TOKEN_ID = -200, IGNORE_INDEX = -100 (taken from longvila.py when it exists)

--------------------------------------------------------------------------------------------------------------
Demo data layout: `python data.py demo --out data/demo --seed 0` (deterministic by seed, a few seconds)
--------------------------------------------------------------------------------------------------------------
Every media path inside a JSON file is RELATIVE TO THAT JSON FILE'S OWN FOLDER (so for the stage files the
media_root is data/demo itself). Videos are mp4 (h264 via PyAV, yuv420p), 64x64 px; images are 64x64 RGB png.
The `tiny` model preset resizes everything to 32x32. Vocabulary: captions and answers use only the fixed word list
WORDS below, so the tiny tokenizer (Tokenizer.tiny(), vocab <= 1024) encodes each word as one token.

Visual world: COLORS = red green blue yellow orange purple cyan white (8 colours, far apart in RGB),
SHAPES = circle square triangle diamond, backgrounds black / gray, motions left right up down.
A NEEDLE frame is one BIG shape (fills ~70% of the frame) of one COLOR on a plain light-gray (200,200,200)
background; haystack frames are 1-3 SMALL shapes drifting slowly on a dark background, so the needle is
visually unmistakable even at 32 px with 4 tokens per frame.

data/demo/
  meta.json            seed, sizes, counts, COLORS (name -> RGB), SHAPES, fps of each video kind, the
                       recommended mixtures and frame counts below (train.py may read it; nothing requires it)
  tokenizer.json       the tiny tokenizer (same file Tokenizer.tiny() builds; ids identical for both templates;
                       copy into a checkpoint's llm/ folder)
  media/images/img_NNNNN.png        stage 1/2 stills: one shape, a colour, a position, a background
  media/short/short_NNNNN.mp4       8 frames at 4 fps (2 s): 1-2 shapes moving; some carry a needle frame
  media/long/long_NNNNN.mp4         32 frames at 1 fps (32 s): 4 segments of 8 s, each with its own shape,
                                    plus exactly one needle frame at a random position
  stage1.json   alignment: image-caption pairs (LLaVA-558k style: human "<image>\\n", gpt "a red circle ...")
  stage2.json   pre-training: longer image captions, short-video captions ("<video>\\nDescribe the video."),
                and interleaved two-image samples ("<image>\\n<image>\\nDescribe the two images.")
  stage3.json   short-video instruction QA on media/short: colour / shape / motion / counting / needle
                questions (one-word answers) and VideoMME-format multiple choice (answer = a letter)
  stage4.txt    long text for context extension: documents of filler sentences with a passkey
                ("the pass key is 48213 . remember it .") at a random depth and the question
                ("what is the pass key ? the pass key is 48213 .") at the end; documents separated by a blank line
  stage4.bin    the same text pre-tokenised with the tiny tokenizer, uint32 (documents separated by .eod_id)
  stage5.json   long-video QA on media/long: "What color is the needle?", summary ("Describe the video." ->
                ordered segment captions), temporal order, counting; mix with stage3.json for short data
                (recommended mixture: [("stage5.json", 1.0), ("stage3.json", 0.5)], num_frames=32 so every
                frame - and so the needle - is kept; with fps=1 the same 32 frames are read)
  eval/                                 HELD OUT: generated with different seeds than everything above
    niah/haystack/haystack_NNN.mp4      64 s haystack videos encoded at 2 fps (128 frames); read at 1 fps -> 64
                                        frames; no needle inside (evaluate.py niah inserts one at depth d)
    niah/needles/needle_NNN.png         8 needles (one per colour), 64x64
    niah/needles/needles.json           [{"image": "needle_000.png", "question": "What color is the needle?",
                                          "answer": "red"}, ...]
    mcq/videos/mcq_NNNNN.mp4            held-out short videos (8 frames at 4 fps)
    mcq/mcq.json                        VideoMME format: [{"video": "videos/mcq_00000.mp4", "question": ...,
                                          "options": ["A. red", "B. blue", "C. green", "D. cyan"],
                                          "answer": "A", "duration": "short"}, ...]
    caption/caption.json                [{"video": "videos/cap_NNN.mp4", "caption": "first a red circle ..."}]:
                                        held-out long videos (32 frames at 1 fps, no needle) with reference
                                        captions (the summary answer of stage5.json)
    caption/videos/cap_NNN.mp4
    stage4_val.txt                      held-out passkey documents (same format as stage4.txt) for ppl/passkey
    stage{1,2,3,5}_val.json             held-out samples in the stage files' format (media under eval/media/,
                                        paths relative to eval/)
"""
