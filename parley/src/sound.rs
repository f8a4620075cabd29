//! The sound card for `parley client` (cargo feature `sound-card`):
//! microphone and speaker through cpal, converted to and from the 48 kHz
//! mono the device speaks.

use std::sync::mpsc;

use anyhow::{anyhow, bail, Context, Result};
use client_sdk::device::LiveAudio;
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{FromSample, Sample, SizedSample};

const RATE: u32 = 48_000;

/// The open streams; they stop when this is dropped.
#[derive(Debug)]
pub struct SoundCard {
    stop: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SoundCard {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens the input `mic` and the output `speaker` ("default" or a cpal
/// device id, as `parley client devices` would list them), each if named.
/// Returns the streams and the device's microphone and speaker buffers.
pub fn open(
    mic: Option<String>,
    speaker: Option<String>,
) -> Result<(SoundCard, Option<LiveAudio>, Option<LiveAudio>)> {
    let input = mic.as_ref().map(|_| LiveAudio::default());
    let output = speaker.as_ref().map(|_| LiveAudio::default());
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let (stop, stop_rx) = mpsc::channel::<()>();
    let (i, o) = (input.clone(), output.clone());
    // cpal's streams stay on the thread that made them.
    let thread = std::thread::Builder::new()
        .name("sound-card".into())
        .spawn(move || {
            let streams = (|| -> Result<Vec<cpal::Stream>> {
                let host = cpal::default_host();
                let mut streams = Vec::new();
                if let (Some(name), Some(buf)) = (mic, i) {
                    let dev = pick(&host, &name, true)?;
                    streams.push(input_stream(&dev, buf)?);
                }
                if let (Some(name), Some(buf)) = (speaker, o) {
                    let dev = pick(&host, &name, false)?;
                    streams.push(output_stream(&dev, buf)?);
                }
                for s in &streams {
                    s.play().context("starting a sound stream")?;
                }
                Ok(streams)
            })();
            match streams {
                Ok(streams) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.recv();
                    drop(streams);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow!("the sound card thread stopped"))??;
    Ok((
        SoundCard {
            stop,
            thread: Some(thread),
        },
        input,
        output,
    ))
}

fn pick(host: &cpal::Host, name: &str, input: bool) -> Result<cpal::Device> {
    let what = if input { "input" } else { "output" };
    let dev = if name == "default" {
        if input {
            host.default_input_device()
        } else {
            host.default_output_device()
        }
    } else {
        let id: cpal::DeviceId = name
            .parse()
            .map_err(|e| anyhow!("sound device id {name:?}: {e:?}"))?;
        host.device_by_id(&id)
    };
    dev.ok_or_else(|| anyhow!("no {what} sound device {name:?}"))
}

fn input_stream(dev: &cpal::Device, buf: LiveAudio) -> Result<cpal::Stream> {
    let cfg = dev
        .default_input_config()
        .context("the microphone's format")?;
    let format = cfg.sample_format();
    let config: cpal::StreamConfig = cfg.into();
    match format {
        cpal::SampleFormat::I16 => build_input::<i16>(dev, config, buf),
        cpal::SampleFormat::F32 => build_input::<f32>(dev, config, buf),
        f => bail!("microphone sample format {f} is not supported"),
    }
}

fn output_stream(dev: &cpal::Device, buf: LiveAudio) -> Result<cpal::Stream> {
    let cfg = dev
        .default_output_config()
        .context("the speaker's format")?;
    let format = cfg.sample_format();
    let config: cpal::StreamConfig = cfg.into();
    match format {
        cpal::SampleFormat::I16 => build_output::<i16>(dev, config, buf),
        cpal::SampleFormat::F32 => build_output::<f32>(dev, config, buf),
        f => bail!("speaker sample format {f} is not supported"),
    }
}

fn report(e: cpal::Error) {
    tracing::warn!(error = %e, "sound stream");
}

fn build_input<T>(
    dev: &cpal::Device,
    config: cpal::StreamConfig,
    buf: LiveAudio,
) -> Result<cpal::Stream>
where
    T: SizedSample,
    f32: FromSample<T>,
{
    let channels = usize::from(config.channels.max(1));
    let rate = config.sample_rate;
    let stream = dev.build_input_stream(
        config,
        move |data: &[T], _: &_| {
            let mono: Vec<f32> = data
                .chunks(channels)
                .map(|c| c.iter().map(|s| f32::from_sample(*s)).sum::<f32>() / c.len() as f32)
                .collect();
            let at48 = crate::client::resample(&mono, rate, RATE);
            let pcm: Vec<i16> = at48.iter().map(|s| i16::from_sample(*s)).collect();
            buf.push(&pcm);
        },
        report,
        None,
    )?;
    Ok(stream)
}

fn build_output<T>(
    dev: &cpal::Device,
    config: cpal::StreamConfig,
    buf: LiveAudio,
) -> Result<cpal::Stream>
where
    T: SizedSample + FromSample<f32>,
{
    let channels = usize::from(config.channels.max(1));
    let rate = config.sample_rate;
    let stream = dev.build_output_stream(
        config,
        move |data: &mut [T], _: &_| {
            let frames = data.len() / channels;
            let want = (frames as u64 * u64::from(RATE) / u64::from(rate.max(1))) as usize;
            let mut pcm = vec![0i16; want.max(1)];
            buf.pull(&mut pcm);
            let mono: Vec<f32> = pcm.iter().map(|s| s.to_sample::<f32>()).collect();
            let mut out = crate::client::resample(&mono, RATE, rate);
            out.resize(frames, 0.0);
            for (frame, s) in data.chunks_mut(channels).zip(out) {
                for x in frame {
                    *x = T::from_sample(s);
                }
            }
        },
        report,
        None,
    )?;
    Ok(stream)
}
