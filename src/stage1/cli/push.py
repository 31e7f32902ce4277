"""The work of vqrae-push (its flags and help text: stage1/cli/arguments.py)."""

from __future__ import annotations

from ..model.hub import push_to_hub, stage_model
from .arguments import launch
from .common import check_apart_from_model, check_output


def run(args) -> int:
    keywords = {"encoder_config_path": args.encoder_path} if args.encoder_path else {}
    metadata = dict(license_=args.license, base_model=args.base_model, datasets=args.datasets,
                    eval_dataset=args.eval_dataset)
    if args.stage is not None:
        check_output(args.stage, folder=True)
        check_apart_from_model(args.stage, args.model, "--stage")
        stage_model(args.model, args.repo, args.stage, args.results, args.samples, metadata, **keywords)
        print(f"staged the upload of {args.model} for {args.repo} in {args.stage} (nothing sent)")
        return 0
    url = push_to_hub(args.model, args.repo, private=args.private, results=args.results, samples=args.samples,
                      metadata=metadata, **keywords)
    print(f"pushed {args.model} to https://huggingface.co/{args.repo} ({url}); load it with "
          f'VQRAE.from_pretrained("{args.repo}")')
    return 0


def main(argv=None) -> int:
    return launch("push", argv)


if __name__ == "__main__":
    raise SystemExit(main())
