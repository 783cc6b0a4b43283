"""The seed's FastAPI server, re-implemented faithfully as the benchmark's baseline (not for serving).

As the seed did it: the model loaded in-process at import, `POST /classify/` with an `UploadFile`
field `image`, and inside the (async) request handler one image per forward pass: PIL open, RGB,
resize to 32x32, ToTensor, Normalize with the CIFAR-100 statistics, argmax, the display name;
errors as {"error": str(e)}; CORS open to every origin.

    SEED_WEIGHTS=model/weights/CIFAR100_model.pth uvicorn benchmarks.seed_server:app --port 8001
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch
import torchvision.transforms as transforms
from fastapi import FastAPI, File, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from PIL import Image

from model import CIFAR100_MEAN, CIFAR100_STD, load_network
from model.classes import CLASS_NAMES, display_name
from model.shipped import SHIPPED_WEIGHTS

WEIGHTS = Path(os.environ.get("SEED_WEIGHTS", SHIPPED_WEIGHTS))

model = load_network(WEIGHTS).eval()

transform = transforms.Compose([
    transforms.Resize((32, 32)),
    transforms.ToTensor(),
    transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
])

app = FastAPI()
app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                   allow_headers=["*"])


@app.post("/classify/")
async def classify(image: UploadFile = File(...)):
    try:
        contents = await image.read()
        picture = Image.open(io.BytesIO(contents)).convert("RGB")
        tensor = transform(picture).unsqueeze(0)
        with torch.no_grad():
            outputs = model(tensor)
            _, predicted = torch.max(outputs, 1)
        return {"prediction": display_name(CLASS_NAMES[predicted.item()])}
    except Exception as e:  # the seed's catch-all
        return JSONResponse(status_code=500, content={"error": str(e)})
