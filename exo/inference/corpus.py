"""A small English corpus to train synthetic models' tokenizers on (written for exo, public domain)."""

from __future__ import annotations

ENGLISH_CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the window.
A cluster of ordinary machines can serve a large language model when each one holds a few layers.
Hello, how are you today? I am fine, thank you. What would you like to talk about?
The weather was cold and grey in the morning, but by the afternoon the sun came out again.
She opened the door, looked around the quiet room, and sat down at the wooden table to write.
Numbers such as 1, 2, 3, 10, 42, 100, 2024 and 3.14159 appear in many kinds of documents.
Please summarize the following paragraph in one sentence and explain your reasoning step by step.
Computers store information as bits, and programs turn those bits into text, images and sound.
The river runs through the valley, past the old mill, and into the sea beyond the hills.
Every morning he walked to the market to buy bread, cheese, apples and a newspaper.
In the beginning there was only darkness, and then someone found the light switch.
Write a short poem about the ocean, the wind, and the stars that shine above the waves.
The committee will meet on Monday to discuss the budget, the schedule and the new building.
Good software is simple to read, easy to test, and honest about the errors it can make.
Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.
The children played in the park until the lamps were lit and their parents called them home.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
Machine learning models learn patterns from examples and then make predictions about new data.
The library was full of old books, maps, letters and photographs from the last two centuries.
If you have any questions, please ask them now, because the meeting will end in ten minutes.
A network sends messages between machines; sometimes they arrive late, and sometimes not at all.
The recipe needs two cups of flour, one egg, a spoon of sugar, and a little salt and butter.
They travelled by train across the country, watching forests, fields and towns pass by.
An assistant answers questions clearly, admits when it does not know, and asks for details.
The function returns a list of tokens, and each token is an integer that stands for some text.
Music filled the hall as the orchestra began to play the first movement of the symphony.
Spring brings rain and flowers, summer brings heat, autumn brings wind, and winter brings snow.
The doctor said that rest, water and good food would help the patient recover quickly.
Our team builds tools that let people run models on the computers they already own.
The cat slept on the warm windowsill, ignoring the birds that sang in the garden below.
Open the file, read each line, count the words, and print the total at the end.
History teaches us that small changes, repeated over many years, can reshape the world.
The mountain trail was steep and rocky, but the view from the summit was worth the climb.
Yes, no, maybe, perhaps, certainly, never, always, sometimes, often, rarely, usually.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday make up the week.
January, February, March, April, May, June, July, August, September, October, November, December.
Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow.
The server listens on a port, accepts a request, does some work, and sends back a response.
A good question is often more useful than a quick answer, so take the time to think.
The ship left the harbour at dawn, its white sails bright against the dark blue water.
He said, "I will be there at seven o'clock," and she replied, "Don't be late again!"
Tools can be called with arguments; the result is returned as JSON and read by the model.
{"name": "get_weather", "arguments": {"city": "London", "unit": "celsius"}}
The temperature today is 21 degrees, with light wind from the west and a chance of rain.
def add(a, b): return a + b  # a tiny function that adds two numbers together
for item in items: print(item)  # loop over a list and print each element
Thank you for your help! You are welcome; it was a pleasure to assist you today.
"""
